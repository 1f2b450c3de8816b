"""GPT-2: pre-LN decoder blocks ``h.N`` with fused QKV (``Conv1D`` layers, weights stored ``[in, out]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from calib.families import FamilySpec, FoldRule, RotationSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def value_rows(config: PretrainedConfig) -> tuple[int, int]:
    """The V part of the fused QKV projection's outputs: its last third."""
    return 2 * config.n_embd, 3 * config.n_embd


SPEC = FamilySpec(
    name="gpt2",
    block="h",
    fold_rules=(
        FoldRule(("attn.c_attn",), "norm", "ln_1"),
        FoldRule(("attn.c_proj",), "rows", "attn.c_attn", rows=value_rows),
        FoldRule(("mlp.c_fc",), "norm", "ln_2"),
    ),
    attention="attn",
    config_class="GPT2Config",
    sizes={
        "n_embd": "hidden",
        "n_layer": "layers",
        "n_head": "heads",
        "n_inner": "intermediate",
        "n_positions": "max_positions",
    },  # fmt: skip
    config_extra={"bos_token_id": 1, "eos_token_id": 2},
    rotation=RotationSpec(
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        norm_readers=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
        writers=("attn.c_proj", "mlp.c_proj"),
        value="attn.c_attn",
        output="attn.c_proj",
        down="mlp.c_proj",
        value_rows=value_rows,
    ),
)
