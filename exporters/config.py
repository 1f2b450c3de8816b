"""The exporters' typed configuration: which artifacts the export stage makes, how validation measures them and
how Triton serves them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from calib.config import Count, Fraction, Positive, Range

ExportFormat = Literal["onnx", "trt", "triton"]
CpuInt8Weights = Literal["auto", "int8", "uint8"]


@dataclass(frozen=True)
class ExportConfig:
    """Which artifacts to produce beyond the student (``--export`` on the command line adds to these).
    ``int4_accuracy_level``: MatMulNBits' compute mode in the CPU flavour (0: float on the dequantized weights,
    the student's function; 4: int8 compute). ``int4_weight_only``: group sizes of extra W4A16 CPU models of
    the teacher (round-to-nearest, no calibration needed)."""

    formats: tuple[ExportFormat, ...] = ("onnx",)
    opset: Annotated[int, Range("17 to 21 (per-channel Q/DQ needs 17; int4 raises it to 21)", 17, 21)] = 17
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] = 0  # MatMulNBits' accuracy_level
    # 8-bit weights in the CPU flavour: int8, or uint8 + 128 (exact on AVX2-only x86); auto: by this machine
    cpu_int8_weights: CpuInt8Weights = "auto"
    int4_weight_only: tuple[int, ...] = ()
    # ONNX Runtime's dynamic int8 of the FP32 graph: the data-free bar the student must beat, validated beside it
    ort_dynamic_baseline: bool = True


@dataclass(frozen=True)
class DecoderCheckConfig:
    """A causal LM's generation checks: greedy continuations of ``prompts`` fixed prompts (``new_tokens`` each)
    against the PyTorch model, the cached graph's perplexity on ``cache_windows`` evaluation windows against its
    full-sequence call, and prefill / next-token latency at a past of ``past`` tokens for each batch size."""

    prompts: Positive = 20
    new_tokens: Positive = 32
    cache_windows: Positive = 2
    past: Positive = 256
    batches: tuple[Positive, ...] = (1, 4)
    repeats: Positive = 30


@dataclass(frozen=True)
class ValidateConfig:
    """Shapes to time, how, and the thresholds that fail the stage (``decoder``: causal LMs only)."""

    shapes: tuple[tuple[Positive, Positive], ...] = ((1, 128), (8, 128))
    warmup: Count = 3
    repeats: Positive = 20
    threads: Count = 0
    min_agreement: Fraction | None = None
    samples: Positive = 64
    decoder: DecoderCheckConfig = DecoderCheckConfig()


@dataclass(frozen=True)
class DynamicBatchingConfig:
    """Triton's dynamic batcher as given: the batch sizes it waits for (each at most the largest validated batch)
    and how long it may hold a request for them."""

    preferred_batch_sizes: tuple[Positive, ...] = ()
    max_queue_delay_us: Count = 0


@dataclass(frozen=True)
class ServeConfig:
    """How the Triton repositories (``serve`` and the package stage) run the model: ``instances`` copies of it
    (``instance_group`` count), each with its own ONNX Runtime session; ``dynamic_batching`` when given, else the
    batcher the validate stage's measured batch latencies suggest."""

    instances: Positive = 1
    dynamic_batching: DynamicBatchingConfig | None = None
