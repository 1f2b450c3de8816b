"""Llama: pre-RMSNorm decoder blocks ``layers.N``, grouped-query attention, gated MLP."""

from calib.families import STANDARD_SIZES, FamilySpec, FoldRule, RotationSpec

SPEC = FamilySpec(
    name="llama",
    block="layers",
    fold_rules=(
        FoldRule(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", "input_layernorm"),
        FoldRule(("self_attn.o_proj",), "rows", "self_attn.v_proj", exact_with_grouped_kv=False),
        FoldRule(("mlp.gate_proj", "mlp.up_proj"), "norm", "post_attention_layernorm"),
        FoldRule(("mlp.down_proj",), "rows", "mlp.up_proj"),
    ),
    attention="self_attn",
    config_class="LlamaConfig",
    sizes={**STANDARD_SIZES, "num_key_value_heads": "kv_heads"},
    config_extra={"bos_token_id": 1, "eos_token_id": 2},
    rotation=RotationSpec(
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
        norm_readers=(
            ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        writers=("self_attn.o_proj", "mlp.down_proj"),
        value="self_attn.v_proj",
        output="self_attn.o_proj",
        down="mlp.down_proj",
    ),
)
