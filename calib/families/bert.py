"""BERT: post-LN encoder blocks ``encoder.layer.N``; Q, K and V read the attention input."""

from calib.families import FamilySpec, FoldRule

# Post-LN: the LayerNorm output is also the residual stream, so no division folds into it (an explicit
# Mul stays, with quant.quadapter.positions: all).
SPEC = FamilySpec(
    name="bert",
    block="layer",
    fold_rules=(
        FoldRule(("attention.self.query", "attention.self.key", "attention.self.value")),
        FoldRule(("attention.output.dense",), "rows", "attention.self.value"),
        FoldRule(("intermediate.dense",)),
    ),
    attention="attention.self",
    config_class="BertConfig",
    task_kinds=("embedding", "classification"),
)
