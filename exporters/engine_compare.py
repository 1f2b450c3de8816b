"""Output comparison of two runtimes on the same feeds with Polygraphy's comparator: the build stage's TensorRT
engine against ONNX Runtime on its graph, or any two runners (two ORT sessions on CPU-only machines)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calib.errors import StageUnavailable
from exporters.cpu_kernels import ort_session
from exporters.decoding import CacheLayout, position_ids

# Stated bound for TensorRT vs ONNX Runtime on the same Q/DQ graph: different kernels may round an int8
# value to the neighbouring step, so outputs agree to a fraction of their spread, not bit for bit.
DEFAULT_ATOL_FRACTION = 0.02
DEFAULT_MIN_COSINE = 0.999


@dataclass(frozen=True)
class Comparison:
    """How two runtimes' outputs differ over every feed."""

    reference: str
    candidate: str
    passed: bool
    max_abs_diff: float
    atol: float
    min_cosine: float
    feeds: int

    def describe(self) -> str:
        """One line for logs and stage summaries."""
        verdict = "agree" if self.passed else "DISAGREE"
        return (
            f"{self.candidate} vs {self.reference}: {verdict} over {self.feeds} feeds "
            f"(max |diff| {self.max_abs_diff:.4g}, bound {self.atol:.4g}; min cosine {self.min_cosine:.6f})"
        )


def random_feeds(
    shapes: Sequence[tuple[int, int]], vocab_size: int, seed: int = 0, cache: CacheLayout | None = None
) -> list[dict[str, np.ndarray]]:
    """Token ids and masks (the last quarter of each row padded) at each (batch, sequence) shape. A graph with a
    KV ``cache`` gets, per shape, the prompt's call (an empty past) and one next token on a random past one token
    shorter (past and new tokens within the shape's length, as the engine's profile allows)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for batch, seq_len in shapes:
        ids = rng.integers(5, vocab_size, size=(batch, seq_len), dtype=np.int64)
        mask = np.ones((batch, seq_len), dtype=np.int64)
        mask[:, seq_len - seq_len // 4 :] = 0
        feeds.append({"input_ids": ids, "attention_mask": mask})
        if cache is not None:
            feeds[-1] |= {"position_ids": position_ids(mask), **dict(zip(cache.past_names, cache.empty_past(batch)))}
            shape = (batch, cache.kv_heads, seq_len - 1, cache.head_dim)
            past = [(rng.standard_normal(shape) * (1 if cache.dtype == "float32" else 20)).astype(cache.dtype)
                    for _ in cache.past_names]  # fmt: skip
            step = {"input_ids": ids[:, :1], "attention_mask": np.ones((batch, seq_len), dtype=np.int64)}
            step["position_ids"] = np.full((batch, 1), seq_len - 1, dtype=np.int64)
            feeds.append(step | dict(zip(cache.past_names, past)))
    return feeds


def onnxruntime_runner(path: Path, name: str, reference_qdq: bool = True) -> Any:
    """A Polygraphy runner for an ONNX model on ONNX Runtime's CPU provider.

    By default Q/DQ run by their ONNX definition (int32 accumulation, as TensorRT computes), not through
    ORT's fused int8 kernels, which saturate on AVX2-only CPUs (:mod:`exporters.cpu_kernels`)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: ort_session(path, reference_qdq=reference_qdq), name=name)


def tensorrt_runner(engine_path: Path, name: str) -> Any:
    """A Polygraphy runner for a serialized TensorRT engine."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(engine_path.read_bytes()), name=name)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def compare_runners(
    reference: Any,
    candidate: Any,
    feeds: list[dict[str, np.ndarray]],
    atol_fraction: float = DEFAULT_ATOL_FRACTION,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> Comparison:
    """Run both on every feed with Polygraphy's Comparator and check its absolute tolerance (a fraction of
    the reference outputs' spread) plus a cosine floor per output."""
    try:
        from polygraphy.comparator import Comparator, SimpleCompareFunc
    except ImportError:
        raise StageUnavailable("Polygraphy is not installed (pip install polygraphy)") from None
    results = Comparator.run([reference, candidate], data_loader=feeds)
    reference_outputs = [out for iteration in results[0][1] for out in iteration.values()]
    candidate_outputs = [out for iteration in results[1][1] for out in iteration.values()]
    spread = max(float(np.ptp(out)) for out in reference_outputs)
    atol = atol_fraction * spread
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=0.0))
    max_diff = max(float(np.abs(r - c).max()) for r, c in zip(reference_outputs, candidate_outputs))
    cosine = min(_cosine(r, c) for r, c in zip(reference_outputs, candidate_outputs))
    return Comparison(
        reference=results[0][0],
        candidate=results[1][0],
        passed=bool(accuracy) and cosine >= min_cosine,
        max_abs_diff=max_diff,
        atol=atol,
        min_cosine=cosine,
        feeds=len(feeds),
    )
