"""Fake quantizers with learnable step sizes (LSQ, arXiv 1902.08153): signed integers on the full grid, zero
point 0 (what TensorRT takes, and shifted by 128 what ORT's CPU kernels fuse), or for grouped weights an integer
zero point per group fixed at initialisation (asymmetric, as ONNX Runtime's MatMulNBits takes it). :meth:`to_int`
is the single place integers come from, so the student and every exported graph use the same numbers."""

from __future__ import annotations

import math

import torch
from torch import nn

from calib.capabilities import RUNTIMES
from calib.range_init import RangeObserver, asymmetric_grid, asymmetric_range

QUANTIZER_BITS = tuple(sorted({b for support in RUNTIMES["pytorch"] for b in support.weight_bits}))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even (as ONNX QuantizeLinear does) with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``factor`` (LSQ's step-size gradient scaling)."""
    return (x - x * factor).detach() + x * factor


class TensorQuantizer(nn.Module):
    """Quantize-dequantize a tensor per tensor, per row (output channel), or in groups along the last axis.

    ``scale`` has the shape that broadcasts against the tensor (after grouping): ``[]`` per tensor,
    ``[rows, 1]`` per channel, ``[rows, cols // group, 1]`` per group. With ``zero_point`` the quantizer is
    asymmetric: ``zero_point`` (a buffer of ``scale``'s shape, integers in [qmin, qmax]) is set with the range
    and not learned (the step sizes are), and x maps to ``clamp(round(x / scale) + zero_point)``.
    """

    def __init__(
        self, bits: int, granularity: str = "per-tensor", group_size: int | None = None, zero_point: bool = False
    ) -> None:
        super().__init__()
        if bits not in QUANTIZER_BITS:
            raise ValueError(f"bits must be one of {QUANTIZER_BITS} (calib.capabilities), got {bits}")
        if granularity == "per-group" and not group_size:
            raise ValueError("per-group quantization needs a group size")
        self.bits = bits
        self.granularity = granularity
        self.group_size = group_size if granularity == "per-group" else None
        self.qmin = -(2 ** (bits - 1))
        self.qmax = 2 ** (bits - 1) - 1
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.zero_point: torch.Tensor | None
        self.register_buffer("zero_point", torch.zeros(()) if zero_point else None)
        self.observer: RangeObserver | None = None
        self.enabled = True  # False passes tensors through in float (for equivalence checks and ablations)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        zero = ", zero_point=True" if self.zero_point is not None else ""
        return f"bits={self.bits}, granularity={self.granularity}{group}{zero}"

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "per-group":
            rows, cols = x.shape
            return x.reshape(rows, cols // self.group_size, self.group_size)
        return x

    def set_scale(self, scale: torch.Tensor) -> None:
        """Set the step size exactly (shape as documented on the class)."""
        self.scale = nn.Parameter(scale.detach().to(torch.float32).clone(), requires_grad=self.scale.requires_grad)

    def set_zero_point(self, zero: torch.Tensor) -> None:
        """Set an asymmetric quantizer's integer zero points (``scale``'s shape)."""
        if self.zero_point is None:
            raise ValueError("a symmetric quantizer has no zero point")
        self.zero_point = zero.detach().to(torch.float32).clone()

    @property
    def offset(self) -> torch.Tensor | float:
        """The zero point to add after dividing by the step (0 when symmetric)."""
        return 0.0 if self.zero_point is None else self.zero_point

    def init_scale(self, absmax: torch.Tensor) -> None:
        """Set the step size from a clipping range (|x| <= absmax maps onto the grid)."""
        self.set_scale((absmax / self.qmax).clamp(min=1e-8))

    def init_from_tensor(self, x: torch.Tensor, method: str) -> None:
        """Initialise from the tensor itself (weights): per channel or group."""
        grouped = self._grouped(x.detach())
        if self.granularity == "per-tensor":
            flat = grouped.reshape(1, -1)
        else:
            flat = grouped.reshape(-1, grouped.shape[-1])
        shape = () if self.granularity == "per-tensor" else (*grouped.shape[:-1], 1)
        if self.zero_point is not None:
            scale, zero = asymmetric_grid(*asymmetric_range(flat, method, self.qmin, self.qmax), self.qmin, self.qmax)
            self.set_scale(scale.reshape(shape))
            self.set_zero_point(zero.reshape(shape))
            return
        observer = RangeObserver(method=method)
        absmax = observer.rowwise_absmax(flat, self.qmin, self.qmax)
        self.init_scale(absmax.reshape(shape))

    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """The integer tensor (float dtype) of ``x``, in x's own shape."""
        grouped = self._grouped(x)
        q = torch.clamp(torch.round(grouped / self.scale + self.offset), self.qmin, self.qmax)
        return q.reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.observe(x)
            return x
        if not self.enabled:
            return x
        grouped = self._grouped(x)
        scale = self.scale
        if scale.requires_grad:
            per_scale = grouped.numel() / max(scale.numel(), 1)
            scale = scale_grad(scale, 1.0 / math.sqrt(per_scale * self.qmax))
        q = round_ste(torch.clamp(grouped / scale + self.offset, self.qmin, self.qmax))
        return ((q - self.offset) * scale).reshape(x.shape)


class DynamicBlockQuantizer(nn.Module):
    """Dynamic int8 quantize-dequantize of the last axis in blocks of ``block_size``: each row's block gets the
    scale max|x| / 127, computed from the tensor itself (nothing to calibrate or learn). It is what ONNX Runtime's
    MatMulNBits does to its input when it computes in int8 (accuracy_level 4): x * (127 / max|x|), rounded half
    to even, so the exported graph reproduces the student up to float summation order."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.qmax = 127
        self.enabled = True  # False passes tensors through in float

    def extra_repr(self) -> str:
        return f"bits=8, granularity=per-block, block_size={self.block_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // self.block_size, self.block_size)
        amax = blocks.detach().abs().amax(-1, keepdim=True)
        inverse = torch.where(amax > 0, self.qmax / amax, torch.zeros_like(amax))
        q = round_ste(blocks * inverse)
        return (q * (amax / self.qmax)).reshape(x.shape)
