"""Int8 fake quantization of the attention matmuls' four inputs (QK^T, AV), behind
``quant.attention_matmuls``: one attention function for every family (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from calib.families import family_of
from calib.quantizers import TensorQuantizer

IMPLEMENTATION = "zsaq_quantized_attention"
ROLES = ("query", "key", "probs", "value")  # QK^T reads query and key; AV reads probs and value


class AttentionQuantizers(nn.Module):
    """The four per-tensor int8 quantizers of one attention module's matmul inputs."""

    def __init__(self) -> None:
        super().__init__()
        for role in ROLES:
            self.add_module(role, TensorQuantizer(8))

    def quantizer(self, role: str) -> TensorQuantizer:
        """The quantizer of one matmul input (one of :data:`ROLES`)."""
        return getattr(self, role)


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
    """Eager attention with the matmul inputs fake-quantized by ``module.attn_quantizers``."""
    q: AttentionQuantizers = module.attn_quantizers
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q.query(query), q.key(key).transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(q.probs(probs), q.value(value))
    return output.transpose(1, 2).contiguous(), probs


AttentionInterface.register(IMPLEMENTATION, quantized_attention)
AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)  # an additive float mask, as eager attention takes


def attention_module_names(backbone: nn.Module) -> list[str]:
    """Qualified names of the attention modules inside the numbered transformer blocks, in order."""
    leaf = family_of(backbone).attention
    return [name for name, _ in backbone.named_modules() if name.endswith("." + leaf)]


def attach_attention_quantizers(backbone: nn.Module) -> list[str]:
    """Give every attention module its quantizers and switch the model to the quantized attention."""
    names = attention_module_names(backbone)
    for name in names:
        backbone.get_submodule(name).attn_quantizers = AttentionQuantizers()
    backbone.set_attn_implementation(IMPLEMENTATION)
    return names
