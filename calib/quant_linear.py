"""Quantized twins of ``nn.Linear`` (and GPT-2's ``Conv1D``): fake-quantized input and weight; and of the
word-embedding table, weight-only per row (what shrinks an encoder's file; a Gather's output needs no
quantizer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from calib.config import QuantConfig
from calib.quantizers import DynamicBlockQuantizer, TensorQuantizer


def linear_weight(layer: nn.Linear | Conv1D) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]`` and computes ``x @ W + b``)."""
    weight = layer.weight.detach()
    return weight.t().contiguous() if isinstance(layer, Conv1D) else weight.clone()


class QuantLinear(nn.Module):
    """``y = Q_a(x) @ Q_w(W)^T + b`` with the weight stored as ``[out, in]`` whatever the source layer; ``Q_a`` is a
    static per-tensor quantizer or a dynamic per-block one (``quant.activations.granularity``)."""

    def __init__(self, layer: nn.Linear | Conv1D, quant: QuantConfig) -> None:
        super().__init__()
        weight = linear_weight(layer)
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        wq = quant.weights
        self.weight_quantizer = TensorQuantizer(wq.bits, wq.granularity, wq.group_size, wq.zero_point)
        block = quant.activation_block()
        static = quant.activations.bits == 8 and block is None
        self.input_quantizer = TensorQuantizer(8) if static else None  # static: a calibrated, learned scale
        self.dynamic_input_quantizer = None if block is None else DynamicBlockQuantizer(block)
        # A calib.quadapter.ChannelScale shared by the layer's group (or FixedMultiplier from a contract).
        self.quadapter: nn.Module | None = None
        self.frozen_weight: torch.Tensor | None = None  # set by freeze_weight (inference only), not saved
        # calib.rotation's online Hadamard of the input (the weight already carries its transpose), or None
        self.input_rotation: nn.Module | None = getattr(layer, "input_rotation", None)

    @torch.no_grad()
    def freeze_weight(self) -> None:
        """Compute the quantized weight once and use it from now on: the same function, without re-quantizing
        every call (a decoder's token-by-token reference); quantizer learning needs the live quantizer."""
        self.frozen_weight = self.weight_quantizer(self.effective_weight()).detach()

    def effective_weight(self) -> torch.Tensor:
        """The float weight the weight quantizer sees: ``W * a`` along the input axis under a Quadapter. Under an
        online rotation ``H`` (``W`` holds ``W_0 H``) the Quadapter acts before it: ``(W H^T * a) H``, so its
        division can still fold into the producer's rows."""
        factor = None if self.quadapter is None else self.quadapter.weight_factor()
        if factor is None:
            return self.weight
        if self.input_rotation is None:
            return self.weight * factor
        return self.input_rotation(self.unrotated_weight() * factor)

    @torch.no_grad()
    def set_effective_weight(self, target: torch.Tensor) -> None:
        """Store the weight whose :meth:`effective_weight` is ``target`` (GPTQ rounds the weight the quantizer
        sees, Quadapter's factor and an online rotation included, and the result must stay on its grid)."""
        factor = None if self.quadapter is None else self.quadapter.weight_factor()
        if factor is None:
            self.weight.copy_(target)
        elif self.input_rotation is None:
            self.weight.copy_(target / factor)
        else:
            self.weight.copy_(self.input_rotation(self.input_rotation.inverse(target) / factor))

    def unrotated_weight(self) -> torch.Tensor:
        """The weight on the layer's own input, before an online rotation (``W H^T``; ``W`` without one)."""
        return self.weight if self.input_rotation is None else self.input_rotation.inverse(self.weight)

    def input_multiplier(self) -> torch.Tensor | None:
        """``1 / a``, the Quadapter's factor on the input (exported as a Mul where it cannot be folded)."""
        return None if self.quadapter is None else self.quadapter.input_multiplier()

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after the Quadapter's multiplier and the online rotation: what the input quantizer sees."""
        multiplier = self.input_multiplier()
        if multiplier is not None:
            x = x * multiplier
        return x if self.input_rotation is None else self.input_rotation(x)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the quantized weight multiplies: :meth:`transformed_input` through the input quantizer."""
        x = self.transformed_input(x)
        for quantizer in (self.input_quantizer, self.dynamic_input_quantizer):
            if quantizer is not None:
                x = quantizer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        weight = self.frozen_weight
        if weight is None:
            weight = self.weight_quantizer(self.effective_weight())
        return F.linear(x, weight, self.bias)


# The smallest normal float16: a row whose min-max step would be below it (near-zero rows) takes this step
FP16_MIN_STEP = float(torch.finfo(torch.float16).tiny)


def float16_step(scale: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value at or above each step (at least :data:`FP16_MIN_STEP`), as float32: a table's
    row scales are stored in half the bytes with the very numbers the student uses (rounding up keeps every
    row inside the grid), which is what brings MiniLM's W8A8 file under quantize_dynamic's."""
    half = scale.clamp(min=FP16_MIN_STEP).to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < scale, up, half).float()


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` whose table is fake-quantized one row (token) at a time, with float16 row scales. Each
    row's range is the MSE-optimal clip, not its min-max: one column sets the max of many MiniLM rows, and with
    min-max the int8 table moved 4 of SST-2's 872 dev answers, with MSE 2 (docs/RESULTS.md, issue 22)."""

    def __init__(self, embedding: nn.Embedding, bits: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
        self.padding_idx = embedding.padding_idx
        self.weight_quantizer = TensorQuantizer(bits, "per-channel")
        self.weight_quantizer.init_from_tensor(self.weight, "mse")
        self.weight_quantizer.set_scale(float16_step(self.weight_quantizer.scale))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight_quantizer(self.weight), self.padding_idx)
