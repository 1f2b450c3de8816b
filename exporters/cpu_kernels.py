"""What ONNX Runtime's int8 CPU kernels compute on this machine (exact or saturating uint8 x int8 products:
docs/ARCHITECTURE.md), and sessions that run Q/DQ by its definition."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path
from typing import Literal

import onnxruntime as ort

Int8WeightType = Literal["int8", "uint8"]
EXACT_U8S8_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


@cache
def _cpuinfo_value(prefixes: tuple[str, ...]) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of ``prefixes`` (None: no such line)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(prefixes):
                return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    return frozenset((_cpuinfo_value(("flags", "Features")) or "").split())


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    return _cpuinfo_value(("model name",)) or platform.processor() or platform.machine()


MACHINE_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "asimddp", "sve")


def cpu_features() -> str:
    """The SIMD features int8 and float speed depend on, joined by '+' (``baseline`` when none)."""
    return "+".join(f for f in MACHINE_FEATURES if f in cpu_flags()) or "baseline"


def machine_description() -> str:
    """``AMD EPYC (2 cores, x86_64 avx2)``: what a benchmark figure was measured on."""
    return f"{cpu_name()} ({os.cpu_count()} cores, {platform.machine()} {cpu_features()})"


def u8s8_products_exact() -> bool:
    """Whether ONNX Runtime's uint8 x int8 matmuls accumulate without int16 saturation on this CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return any(flag in cpu_flags() for flag in EXACT_U8S8_FEATURES)


def cpu_int8_weight_type(setting: str) -> Int8WeightType:
    """``export.cpu_int8_weights`` resolved for this machine (``auto``: int8 where exact, uint8 otherwise)."""
    if setting == "auto":
        return "int8" if u8s8_products_exact() else "uint8"
    if setting not in ("int8", "uint8"):
        raise ValueError(f"cpu int8 weight type must be auto, int8 or uint8, got {setting!r}")
    return setting  # type: ignore[return-value]


def ort_session(model: Path | bytes, threads: int | None = None, reference_qdq: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime CPU session; ``reference_qdq`` keeps QuantizeLinear/DequantizeLinear as separate ops.

    Reference Q/DQ is how a TensorRT-flavour graph is checked on the CPU: TensorRT accumulates int8 products
    in int32, whereas ONNX Runtime's fused CPU kernels may saturate (see the module docstring)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if reference_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
