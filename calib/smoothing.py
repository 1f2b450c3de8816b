"""SmoothQuant's migration strength chosen per layer group without data (``quadapter.init: smoothquant-search``):
for each group of layers sharing an input, the alpha of a small grid (or no smoothing) whose quantized outputs
on the calibration inputs come closest to the float layers' outputs. The inputs are the float student's, one
sample of rows per group; each candidate gets fresh quantizers initialised as the student's will be."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calib.config import QuantConfig
from calib.quant_linear import QuantLinear
from calib.quantizers import TensorQuantizer
from calib.range_init import RangeObserver

SEARCH_ALPHAS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)  # with None: no smoothing (every scale 1)
SEARCH_ROWS = 1024  # input rows (tokens) per group the search scores on


def smoothquant_scale(layers: list[QuantLinear], act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's closed form (arXiv 2211.10438): a_j = max|X_j|^alpha / max|W_j|^(1-alpha), over the
    layers' weights on their own input (before an online rotation), normalised to mean 1."""
    weight_absmax = torch.stack([layer.unrotated_weight().abs().amax(dim=0) for layer in layers]).amax(dim=0)
    scale = act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)
    return (scale / scale.mean()).clamp(min=1e-3)  # overall size is irrelevant to the function; keep it near 1


def _quantized_output(layer: QuantLinear, x: torch.Tensor, quant: QuantConfig) -> torch.Tensor:
    """The layer on ``x`` with its current Quadapter and fresh quantizers initialised as :func:`calib.student.
    init_ranges` would (weights from themselves, a static input scale from these very rows)."""
    own = layer.weight_quantizer
    weights = TensorQuantizer(own.bits, own.granularity, own.group_size, own.zero_point is not None)
    weight = layer.effective_weight()
    weights.init_from_tensor(weight, quant.weights.init)
    x = layer.transformed_input(x)
    if layer.input_quantizer is not None:
        observer = RangeObserver(quant.activations.init, quant.activations.percentile)
        observer.observe(x)
        activations = TensorQuantizer(8)
        activations.init_scale(observer.result(activations.qmin, activations.qmax))
        x = activations(x)
    elif layer.dynamic_input_quantizer is not None:
        x = layer.dynamic_input_quantizer(x)
    return F.linear(x, weights(weight))


def group_error(layers: list[QuantLinear], x: torch.Tensor, quant: QuantConfig) -> float:
    """Sum over the group's layers of the quantized output's squared error, relative to the float output's size."""
    total = 0.0
    for layer in layers:
        target = F.linear(x, layer.unrotated_weight())
        got = _quantized_output(layer, x, quant)
        total += float((got - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12))
    return total


@torch.no_grad()
def search_smoothing(layers: list[QuantLinear], x: torch.Tensor, quant: QuantConfig) -> float | None:
    """Set the group's shared Quadapter scale to the best candidate on the rows ``x``; returns its alpha (None:
    no smoothing was best)."""
    quadapter = layers[0].quadapter
    absmax = x.abs().amax(dim=0)
    best: tuple[float, float | None, torch.Tensor] | None = None
    for alpha in (None, *SEARCH_ALPHAS):
        scale = torch.ones_like(absmax) if alpha is None else smoothquant_scale(layers, absmax, alpha)
        quadapter.scale.copy_(scale)
        error = group_error(layers, x, quant)
        if best is None or error < best[0]:
            best = (error, alpha, scale)
    quadapter.scale.copy_(best[2])
    return best[1]
