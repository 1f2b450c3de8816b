"""GPTQ (arXiv 2210.17323) on the student's own weight quantizers, block by block on the calibration inputs
(``quant.weights.rounding: gptq``; docs/ARCHITECTURE.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from calib.inputs import Batch
from calib.models import TaskModel
from calib.quant_linear import QuantLinear
from calib.quantizers import TensorQuantizer
from calib.student import quant_layers_by_block


class _BlockDone(Exception):
    """Raised from a hook once every layer of the current block has seen its input."""


def column_scales(quantizer: TensorQuantizer, in_features: int) -> torch.Tensor:
    """``[out, in]`` step size of every weight entry (per channel, or the entry's group)."""
    scale = quantizer.scale.detach()
    if quantizer.granularity == "per-group":
        return scale.squeeze(-1).repeat_interleave(quantizer.group_size, dim=1)
    return scale.reshape(-1, 1).expand(-1, in_features)


@torch.no_grad()
def gptq_weight(
    weight: torch.Tensor, hessian: torch.Tensor, quantizer: TensorQuantizer, damp: float = 0.01, block: int = 128
) -> torch.Tensor:
    """The GPTQ-rounded ``[out, in]`` weight (dequantized, on ``quantizer``'s grid) for input Hessian ``hessian``."""
    w = weight.detach().clone().double()
    h = hessian.detach().clone().double()
    scales = column_scales(quantizer, w.shape[1]).double()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype, device=h.device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    result = torch.zeros_like(w)
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        chunk, errors, inverse = w[:, start:end].clone(), torch.zeros_like(w[:, start:end]), upper[start:end, start:end]
        for i in range(end - start):
            column, step = chunk[:, i], scales[:, start + i]
            rounded = torch.clamp(torch.round(column / step), quantizer.qmin, quantizer.qmax) * step
            result[:, start + i] = rounded
            error = (column - rounded) / inverse[i, i]
            chunk[:, i:] -= error.unsqueeze(1) * inverse[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return result.to(weight.dtype)


@torch.no_grad()
def _block_hessians(
    student: TaskModel, layers: dict[str, QuantLinear], batches: list[Batch]
) -> dict[str, torch.Tensor]:
    """``X^T X`` over the real (unmasked) tokens of every batch, for each layer of one block."""
    hessians = {
        name: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=layer.weight.device)
        for name, layer in layers.items()
    }
    seen: set[str] = set()
    mask: list[torch.Tensor] = []

    def hook(name: str, layer: QuantLinear) -> Callable[[torch.nn.Module, tuple], None]:
        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = layer.quantized_input(args[0])
            rows = x.reshape(-1, x.shape[-1])[mask[0].reshape(-1).bool()].double()
            hessians[name] += rows.T @ rows
            seen.add(name)
            if len(seen) == len(layers):
                raise _BlockDone

        return record

    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers.items()]
    try:
        for batch in batches:
            seen.clear()
            mask[:] = [batch.attention_mask]
            try:
                batch.run(student)
            except _BlockDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


@torch.no_grad()
def apply_gptq(student: TaskModel, batches: Iterable[Batch], damp: float = 0.01) -> None:
    """GPTQ every quantized layer of ``student`` in place, block by block, on ``batches``' inputs.

    Range init must have run: the weight quantizers' step sizes are the grid GPTQ rounds onto.
    """
    batches = list(batches)
    blocks = quant_layers_by_block(student)
    if any(layer.quadapter is not None for layers in blocks.values() for layer in layers.values()):
        raise ValueError("GPTQ runs on students without Quadapter (quant.quadapter.enabled: false)")
    for layers in blocks.values():
        for name, hessian in _block_hessians(student, layers, batches).items():
            layer = layers[name]
            layer.weight.copy_(gptq_weight(layer.weight, hessian, layer.weight_quantizer, damp))
