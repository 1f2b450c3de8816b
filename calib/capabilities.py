"""Which quantization schemes (weight bits x granularity x group size x activation bits) each runtime executes:
the one table that config validation, the exporters, the TensorRT lint and the benchmark rows read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme as a runtime sees it."""

    weight_bits: int
    granularity: str = "per-channel"
    group_size: int | None = None
    act_bits: int = 16
    act_granularity: str = "per-tensor"  # of 8-bit activations: static per-tensor or dynamic per-block
    zero_point: bool = False  # asymmetric weights: an integer zero point per group


@dataclass(frozen=True)
class Support:
    """Schemes a runtime runs with one kernel family: any of ``weight_bits`` at ``granularity`` with one of
    ``group_sizes`` (None: no groups), with activations of any of ``act_bits``, 8-bit ones at any of
    ``act_granularities``; ``zero_points``: whether the kernel takes asymmetric weights."""

    weight_bits: tuple[int, ...]
    granularity: str
    group_sizes: tuple[int | None, ...]
    kernel: str
    act_bits: tuple[int, ...] = (8, 16)
    act_granularities: tuple[str, ...] = ("per-tensor",)
    zero_points: bool = False


# per-block activations: dynamic int8, one scale per row and block of input channels, computed at run time, as
# ONNX Runtime's MatMulNBits computes in int8 (accuracy_level 4); TensorRT's int8 activations are static per tensor
STATIC_AND_DYNAMIC = ("per-tensor", "per-block")
RUNTIMES: dict[str, tuple[Support, ...]] = {
    "pytorch": (
        Support((2, 4, 8), "per-channel", (None,), "fake quantization", act_granularities=STATIC_AND_DYNAMIC),
        Support(
            (2, 4),
            "per-group",
            (32, 64, 128),
            "fake quantization",
            act_granularities=STATIC_AND_DYNAMIC,
            zero_points=True,
        ),
    ),
    "onnxruntime": (
        Support(
            (4, 8),
            "per-channel",
            (None,),
            "MatMulIntegerToFloat (A8), DequantizeLinear (A16), MatMulNBits int8 compute (per-block A8)",
            act_granularities=STATIC_AND_DYNAMIC,
        ),
        Support(
            (2, 4), "per-group", (32, 64, 128), "MatMulNBits", act_granularities=STATIC_AND_DYNAMIC, zero_points=True
        ),
        # 2-bit per channel: MatMulNBits, each channel's scale repeated per block of the dynamic activations
        Support(
            (2,), "per-channel", (None,), "MatMulNBits int8 compute", act_bits=(8,), act_granularities=("per-block",)
        ),
    ),
    "tensorrt": (
        Support((8,), "per-channel", (None,), "int8 GEMM from Q/DQ"),
        Support((4,), "per-group", (64, 128), "blocked int4 DequantizeLinear (opset 21)"),
    ),
}
RUNTIME_NAMES = {"pytorch": "the PyTorch quantizer", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def _options(values: list) -> str:
    words = [str(v) for v in dict.fromkeys(values)]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def unsupported(runtime: str, scheme: Scheme) -> tuple[str, str, object] | None:
    """None when ``runtime`` runs ``scheme``; else (the ``quant.weights``/``activations`` key at fault, what it
    accepts, the value given), for a one-line config error."""
    table = RUNTIMES[runtime]
    name = RUNTIME_NAMES[runtime]
    if not any(scheme.weight_bits in s.weight_bits for s in table):
        return "weights.bits", f"{_options([b for s in table for b in s.weight_bits])} for {name}", scheme.weight_bits
    by_bits = [s for s in table if scheme.weight_bits in s.weight_bits]
    matching = [s for s in by_bits if s.granularity == scheme.granularity]
    if not matching:
        kinds = _options([s.granularity for s in by_bits])
        return "weights.granularity", f"{kinds} for {scheme.weight_bits}-bit weights on {name}", scheme.granularity
    if not any(scheme.group_size in s.group_sizes for s in matching):
        sizes = _options([g for s in matching for g in s.group_sizes])
        return "weights.group_size", f"{sizes} ({name}'s {scheme.weight_bits}-bit group sizes)", scheme.group_size
    if scheme.zero_point and not any(s.zero_points for s in matching):
        where = f"{scheme.granularity} {scheme.weight_bits}-bit weights on {name}"
        return "weights.zero_point", f"false for {where} (symmetric only: zero point 0)", True
    if not any(scheme.act_bits in s.act_bits for s in matching):
        return "activations.bits", f"{_options([a for s in matching for a in s.act_bits])} for {name}", scheme.act_bits
    if scheme.act_bits == 8 and not any(scheme.act_granularity in s.act_granularities for s in matching):
        kinds = _options([g for s in matching for g in s.act_granularities])
        return "activations.granularity", f"{kinds} for {name}", scheme.act_granularity
    return None


def group_sizes(runtime: str, weight_bits: int) -> tuple[int, ...]:
    """The group (block) sizes ``runtime`` takes for grouped weights of ``weight_bits``."""
    return tuple(g for s in RUNTIMES[runtime] if weight_bits in s.weight_bits for g in s.group_sizes if g is not None)
