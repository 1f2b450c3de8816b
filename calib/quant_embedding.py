"""Weight-only quantization of the word-embedding table (per row, int8): what shrinks an encoder's file,
whose FP32 table is often half of it. Activations out of a Gather need no quantizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calib.quantizers import TensorQuantizer


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` whose table is fake-quantized one row (token) at a time."""

    def __init__(self, embedding: nn.Embedding, bits: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        self.padding_idx = embedding.padding_idx
        self.weight_quantizer = TensorQuantizer(bits, "per-channel")
        self.weight_quantizer.init_from_tensor(self.weight, "minmax")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight_quantizer(self.weight), self.padding_idx)
