"""GPTQ (arXiv 2210.17323) on the student's own weight quantizers, block by block on the calibration inputs
(``quant.weights.rounding: gptq``; docs/ARCHITECTURE.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from calib.block_calls import capture_block_call
from calib.inputs import Batch
from calib.models import TaskModel
from calib.quant_linear import QuantLinear
from calib.quantizers import TensorQuantizer
from calib.student import quant_layers_by_block


class _BlockDone(Exception):
    """Raised from a hook once every layer of the current block has seen its input."""


def _per_column(values: torch.Tensor, quantizer: TensorQuantizer, in_features: int) -> torch.Tensor:
    if quantizer.granularity == "per-group":
        return values.squeeze(-1).repeat_interleave(quantizer.group_size, dim=1)
    return values.reshape(-1, 1).expand(-1, in_features)


def column_scales(quantizer: TensorQuantizer, in_features: int) -> torch.Tensor:
    """``[out, in]`` step size of every weight entry (per channel, or the entry's group)."""
    return _per_column(quantizer.scale.detach(), quantizer, in_features)


def column_zero_points(quantizer: TensorQuantizer, in_features: int) -> torch.Tensor:
    """``[out, in]`` zero point of every weight entry (zeros for a symmetric quantizer)."""
    zero = quantizer.zero_point
    return _per_column(torch.zeros_like(quantizer.scale) if zero is None else zero, quantizer, in_features)


@torch.no_grad()
def gptq_weight(
    weight: torch.Tensor, hessian: torch.Tensor, quantizer: TensorQuantizer, damp: float = 0.01, block: int = 128
) -> torch.Tensor:
    """The GPTQ-rounded ``[out, in]`` weight (dequantized, on ``quantizer``'s grid) for input Hessian ``hessian``,
    as the reference implementation runs it with ``--act-order --static-groups``: columns visited by decreasing
    Hessian diagonal (the inputs that carry most energy first, while the most error can still be compensated),
    each rounded with the step (and zero point) of the group it belongs to in the original order, fixed before
    GPTQ starts."""
    w = weight.detach().clone().double()
    h = hessian.detach().clone().double()
    scales = column_scales(quantizer, w.shape[1]).double()
    zeros = column_zero_points(quantizer, w.shape[1]).double()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h, scales, zeros = w[:, order], h[order][:, order], scales[:, order], zeros[:, order]
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype, device=h.device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    result = torch.zeros_like(w)
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        chunk, errors, inverse = w[:, start:end].clone(), torch.zeros_like(w[:, start:end]), upper[start:end, start:end]
        for i in range(end - start):
            column, step, zero = chunk[:, i], scales[:, start + i], zeros[:, start + i]
            rounded = (torch.clamp(torch.round(column / step + zero), quantizer.qmin, quantizer.qmax) - zero) * step
            result[:, start + i] = rounded
            error = (column - rounded) / inverse[i, i]
            chunk[:, i:] -= error.unsqueeze(1) * inverse[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return result[:, torch.argsort(order)].to(weight.dtype)


def _recording_hooks(
    layers: dict[str, QuantLinear],
    hessians: dict[str, torch.Tensor],
    mask: list[torch.Tensor],
    on_all_seen: Callable[[], None] | None = None,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward pre-hooks adding ``X^T X`` of each layer's quantized input over the real (unmasked) tokens of the
    batch whose mask is ``mask[0]``; ``on_all_seen`` is called once every layer has seen its input."""
    seen: set[str] = set()

    def hook(name: str, layer: QuantLinear) -> Callable[[torch.nn.Module, tuple], None]:
        def record(_module: torch.nn.Module, args: tuple) -> None:
            x = layer.quantized_input(args[0])
            rows = x.reshape(-1, x.shape[-1])[mask[0].reshape(-1).bool()].float()
            hessians[name] += (rows.T @ rows).double()  # one batch's product in float32, the sum in float64
            seen.add(name)
            if on_all_seen is not None and len(seen) == len(layers):
                seen.clear()
                on_all_seen()

        return record

    return [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers.items()]


def _empty_hessians(layers: dict[str, QuantLinear]) -> dict[str, torch.Tensor]:
    return {
        name: torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64, device=layer.weight.device)
        for name, layer in layers.items()
    }


def _raise_done() -> None:
    raise _BlockDone


@torch.no_grad()
def _model_hessians(
    student: TaskModel, layers: dict[str, QuantLinear], batches: list[Batch]
) -> dict[str, torch.Tensor]:
    """``X^T X`` of layers outside the blocks (an LM head): the whole model runs, up to them."""
    hessians, mask = _empty_hessians(layers), []
    handles = _recording_hooks(layers, hessians, mask, _raise_done)
    try:
        for batch in batches:
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
def _gptq_layers(layers: dict[str, QuantLinear], hessians: dict[str, torch.Tensor], damp: float) -> None:
    for name, hessian in hessians.items():
        layer = layers[name]
        layer.set_effective_weight(gptq_weight(layer.effective_weight(), hessian, layer.weight_quantizer, damp))


@torch.no_grad()
def apply_gptq(student: TaskModel, batches: Iterable[Batch], damp: float = 0.01) -> None:
    """GPTQ every quantized layer of ``student`` in place, block by block, on ``batches``' inputs.

    As the reference implementation does, each block's inputs are cached once (the previous block's outputs,
    its weights already GPTQ-rounded) and only that block runs to collect its layers' Hessians: the model is
    not re-run from the embeddings for every block. Range init must have run: the weight quantizers' step
    sizes are the grid GPTQ rounds onto. Under Quadapter (smoothing) GPTQ rounds the scaled weight ``W * a``
    against the Hessian of the scaled input ``x / a`` (what the quantizers see), with the scales fixed: scales
    learned afterwards move the weights off GPTQ's grid points, as learned weights do.
    """
    batches = list(batches)
    blocks = quant_layers_by_block(student)
    inside = [name for name in blocks if name is not None]
    if inside:
        calls = [capture_block_call(student, inside[0], batch) for batch in batches]
        hidden = [call.hidden for call in calls]
        for name in inside:
            block, layers = student.backbone.get_submodule(name), blocks[name]
            hessians, mask = _empty_hessians(layers), []
            handles = _recording_hooks(layers, hessians, mask)
            try:
                for call, batch, x in zip(calls, batches, hidden):
                    mask[:] = [batch.attention_mask]
                    call.run(block, x)
            finally:
                for handle in handles:
                    handle.remove()
            _gptq_layers(layers, hessians, damp)
            hidden = [call.run(block, x) for call, x in zip(calls, hidden)]
    if None in blocks:
        _gptq_layers(blocks[None], _model_hessians(student, blocks[None], batches), damp)
