"""The traced side of a causal LM's KV-cache export (the signature itself: :mod:`exporters.decoding`).

Tricky decisions: the cache is a flat list of tensors in and out (a transformers ``DynamicCache`` is rebuilt from
it inside the traced forward, so the exporter sees only tensors); ``position_ids`` is an input for every family
(left-padded batches need positions that skip the padding, as transformers' ``generate`` computes them)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from calib.models import TaskModel
from exporters.decoding import LOGITS, CacheLayout


@torch.no_grad()
def cache_layout(model: TaskModel) -> CacheLayout:
    """Read the layout off one forward of a single token (every family caches ``[batch, heads, seq, dim]``)."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    out = model.backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    layers = out.cache.layers
    _, heads, _, dim = layers[0].keys.shape
    return CacheLayout(len(layers), int(heads), int(dim))


class CachedCausalLM(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``: the traced signature."""

    def __init__(self, model: TaskModel, layout: CacheLayout) -> None:
        super().__init__()
        # the backbone itself, not the task model: its weights keep the names ``backbone.<layer>...`` that
        # :mod:`exporters.onnx_qdq` looks the quantized MatMuls up by
        self.backbone, self.layout = model.backbone, layout

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layout.layers)])
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)

    def example_inputs(self, batch: int, seq_len: int, past_len: int) -> tuple[torch.Tensor, ...]:
        """Inputs to trace with: a past longer than zero, so every shape the trace records is symbolic."""
        ids = torch.ones(batch, seq_len, dtype=torch.long)
        mask = torch.ones(batch, past_len + seq_len, dtype=torch.long)
        positions = torch.arange(past_len, past_len + seq_len).expand(batch, seq_len)
        shape = (batch, self.layout.kv_heads, past_len, self.layout.head_dim)
        return (ids, mask, positions, *(torch.zeros(shape) for _ in self.layout.past_names))

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Batch, new-token, total and past axes of every input and output."""
        axes = {
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            LOGITS: {0: "batch", 1: "sequence"},
        }
        axes.update({name: {0: "batch", 2: "past_sequence"} for name in self.layout.past_names})
        axes.update({name: {0: "batch", 2: "total_sequence"} for name in self.layout.present_names})
        return axes
