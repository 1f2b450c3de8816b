"""Qwen2: Llama's blocks with biases on Q, K and V, and grouped-query attention."""

from calib.families import STANDARD_SIZES, FamilySpec
from calib.families.llama import SPEC as LLAMA

SPEC = FamilySpec(
    name="qwen2",
    block=LLAMA.block,
    fold_rules=LLAMA.fold_rules,  # the biases fold with the rows: fold_quadapters scales them too
    attention=LLAMA.attention,
    config_class="Qwen2Config",
    sizes={**STANDARD_SIZES, "num_key_value_heads": "kv_heads"},
    config_extra={"bos_token_id": 1, "eos_token_id": 2},
    rotation=LLAMA.rotation,
)
