"""Clipping-range initialisation: min-max, percentile, and MSE-optimal clipping search."""

from __future__ import annotations

import torch

# Values kept per observed activation for percentile / MSE search (a uniform subsample per batch).
SAMPLE_PER_BATCH = 65536
# The fractions of the range tried, in steps of 0.01. 2-bit weight rows want as little as a fifth of their absmax
# (MiniLM at 2 bits: median 0.32, 1% of rows below 0.14), so the grid reaches down to 0.05.
MSE_GRID = torch.linspace(0.05, 1.0, 96)


def _mse_absmax(values: torch.Tensor, absmax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per row, the clipping bound (a fraction of absmax) minimising the quantize-dequantize MSE."""
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax.clone()
    for ratio in MSE_GRID.tolist():
        bound = (absmax * ratio).clamp(min=1e-8)
        scale = (bound / qmax).unsqueeze(-1)
        deq = torch.clamp(torch.round(values / scale), qmin, qmax) * scale
        err = (deq - values).pow(2).mean(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, bound, best)
    return best


def asymmetric_grid(low: torch.Tensor, high: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step size and integer zero point (within [qmin, qmax]) of the grid mapping [low, high] onto [qmin, qmax]."""
    scale = ((high - low) / (qmax - qmin)).clamp(min=1e-8)
    return scale, torch.clamp(torch.round(qmin - low / scale), qmin, qmax)


def asymmetric_range(rows: torch.Tensor, method: str, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the range [low, high] of an asymmetric grid, 0 inside it (as ONNX Runtime's and GPTQ's
    asymmetric rounding take it): min-max, or with ``mse`` both ends shrunk by the fraction whose
    quantize-dequantize error is smallest."""
    if method not in ("minmax", "mse"):
        raise ValueError(f"asymmetric ranges are minmax or mse, got {method!r}")
    low, high = rows.amin(dim=-1).clamp(max=0), rows.amax(dim=-1).clamp(min=0)
    if method == "minmax":
        return low, high
    best_err = torch.full_like(low, float("inf"))
    best_ratio = torch.ones_like(low)
    for ratio in MSE_GRID.tolist():
        scale, zero = asymmetric_grid(low * ratio, high * ratio, qmin, qmax)
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
        deq = (torch.clamp(torch.round(rows / scale + zero), qmin, qmax) - zero) * scale
        err = (deq - rows).pow(2).mean(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(low, ratio), best_ratio)
    return low * best_ratio, high * best_ratio


class RangeObserver:
    """Finds |x| bounds, either streaming over activation batches or row-wise over a weight."""

    def __init__(self, method: str = "minmax", percentile: float = 99.99, channel_axis: int | None = None) -> None:
        if method not in ("minmax", "percentile", "mse"):
            raise ValueError(f"unknown range init {method!r}")
        if channel_axis is not None and method != "minmax":
            raise ValueError("a per-channel activation range is min-max only")
        self.channel_axis = channel_axis  # one bound per index of this axis (min-max)
        self.method = method
        self.percentile = percentile
        self.absmax = torch.zeros(())
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(0)

    def observe(self, x: torch.Tensor) -> None:
        """Record one activation batch."""
        if self.channel_axis is not None:
            rows = x.detach().abs().float().movedim(self.channel_axis, 0)
            self.absmax = torch.maximum(self.absmax, rows.reshape(rows.shape[0], -1).amax(dim=1))
            return
        flat = x.detach().abs().reshape(-1).float()
        self.absmax = torch.maximum(self.absmax, flat.max())
        if self.method != "minmax":
            if flat.numel() > SAMPLE_PER_BATCH:
                idx = torch.randint(flat.numel(), (SAMPLE_PER_BATCH,), generator=self.generator)
                flat = flat[idx]
            self.samples.append(flat)

    def result(self, qmin: int, qmax: int) -> torch.Tensor:
        """The clipping bound from everything observed (per channel with ``channel_axis``)."""
        if self.method == "minmax" or not self.samples:
            return self.absmax
        values = torch.cat(self.samples)
        if self.method == "percentile":
            k = max(1, int(round(values.numel() * self.percentile / 100.0)))
            return values.kthvalue(min(k, values.numel())).values
        # Activations: sign matters for the error, but |x| stands in for x on a symmetric grid.
        return _mse_absmax(values.unsqueeze(0), self.absmax.reshape(1), qmin, qmax).reshape(())

    def rowwise_absmax(self, rows: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        """Per-row clipping bound for a weight matrix (rows = channels or groups)."""
        absmax = rows.abs().amax(dim=-1)
        if self.method == "minmax":
            return absmax
        if self.method == "percentile":
            return torch.quantile(rows.abs(), self.percentile / 100.0, dim=-1)
        return _mse_absmax(rows, absmax, qmin, qmax)
