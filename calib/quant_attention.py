"""Int8 fake quantization inside attention, one attention function for every family (docs/ARCHITECTURE.md): the
attention matmuls' four inputs (QK^T, AV), behind ``quant.attention_matmuls``, and the keys and values a causal
LM caches, per key/value head, behind ``quant.kv_cache``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from calib.families import family_of
from calib.quantizers import TensorQuantizer

IMPLEMENTATION = "zsaq_quantized_attention"
ROLES = ("query", "key", "probs", "value")  # QK^T reads query and key; AV reads probs and value
KV_ROLES = ("key", "value")


class RoleQuantizers(nn.Module):
    """One int8 quantizer per role (a submodule named after it)."""

    roles: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        for role in self.roles:
            self.add_module(role, TensorQuantizer(8))

    def quantizer(self, role: str) -> TensorQuantizer:
        """The quantizer of one role (one of :attr:`roles`)."""
        return getattr(self, role)


class AttentionQuantizers(RoleQuantizers):
    """The four per-tensor int8 quantizers of one attention module's matmul inputs (:data:`ROLES`)."""

    roles = ROLES


class KVCacheQuantizers(RoleQuantizers):
    """Int8 quantizers of one attention module's cached keys and values, one scale per key/value head (shape
    ``[1, kv_heads, 1, 1]``). Applied to the whole cache at every call: keys quantized when they were new come
    back unchanged (the same grid), so this is the function of a cache that stores int8."""

    roles = KV_ROLES


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head serves ``groups`` query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def quantized_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with the cache fake-quantized by ``module.kv_quantizers`` and the matmul inputs by
    ``module.attn_quantizers`` (either may be absent)."""
    cache: KVCacheQuantizers | None = getattr(module, "kv_quantizers", None)
    if cache is not None:
        key, value = cache.key(key), cache.value(value)
    matmuls: AttentionQuantizers | None = getattr(module, "attn_quantizers", None)

    def q(role: str, x: torch.Tensor) -> torch.Tensor:
        return x if matmuls is None else matmuls.quantizer(role)(x)

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q("query", query), q("key", key).transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(q("probs", probs), q("value", value))
    return output.transpose(1, 2).contiguous(), probs


AttentionInterface.register(IMPLEMENTATION, quantized_attention)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # an additive float mask, as eager attention takes


def attention_module_names(backbone: nn.Module) -> list[str]:
    """Qualified names of the attention modules inside the numbered transformer blocks, in order."""
    leaf = family_of(backbone).attention
    return [name for name, _ in backbone.named_modules() if name.endswith("." + leaf)]


def attach_attention_quantizers(backbone: nn.Module, matmuls: bool, kv_cache: bool) -> list[str]:
    """Give every attention module its matmul-input and / or cache quantizers and switch the model to the
    quantized attention."""
    names = attention_module_names(backbone)
    for name in names:
        module = backbone.get_submodule(name)
        if matmuls:
            module.attn_quantizers = AttentionQuantizers()
        if kv_cache:
            module.kv_quantizers = KVCacheQuantizers()
    backbone.set_attn_implementation(IMPLEMENTATION)
    return names
