"""One calling convention for every model validation compares: ``runner(ids, mask) -> np.ndarray``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from transformers import DynamicCache

from calib.models import TaskModel
from exporters.cpu_kernels import ort_session
from exporters.decoding import OrtStepper, graph_cache_layout


class TorchRunner:
    """A PyTorch task model (the FP teacher or the fake-quantized student)."""

    def __init__(self, name: str, model: TaskModel, size_bytes: int, threads: int) -> None:
        self.name, self.model, self.size_bytes, self.threads = name, model.eval(), size_bytes, threads
        self.runtime = "pytorch"

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return out.float().numpy()


class OrtRunner:
    """An ONNX model on ONNX Runtime's CPU provider (the provider actually used is recorded). The session opens
    on first use and :meth:`close` lets it go, so a caller can keep one large graph in memory at a time.

    ``reference_qdq`` runs Q/DQ by the ONNX definition instead of ORT's fused int8 kernels: how a graph
    meant for TensorRT is checked here (:func:`exporters.cpu_kernels.ort_session`)."""

    def __init__(self, name: str, path: Path, threads: int, reference_qdq: bool = False) -> None:
        self.name, self.path, self.size_bytes, self.threads = name, path, path.stat().st_size, threads
        self.reference_qdq = reference_qdq
        self.runtime = f"onnxruntime {ort.__version__}"
        self._session: ort.InferenceSession | None = None
        self._decoder: OrtStepper | None = None
        self._output = ""

    def _open(self) -> ort.InferenceSession:
        if self._session is None:
            self._session = ort_session(self.path, self.threads, self.reference_qdq)
            self.runtime = f"onnxruntime {ort.__version__} ({self._session.get_providers()[0]})"
            if self.reference_qdq:
                self.runtime += ", Q/DQ as separate float ops (reference semantics, not int8 kernels)"
            layout = graph_cache_layout(self._session)  # read once: every call below is timed
            self._decoder = None if layout is None else OrtStepper(self._session, layout=layout)  # a causal LM's
            self._output = self._session.get_outputs()[0].name
        return self._session

    @property
    def decoder(self) -> OrtStepper | None:
        """The cached-graph stepper of a causal LM's graph (None for other graphs); opens the session."""
        self._open()
        return self._decoder

    def close(self) -> None:
        """Let the session go (the next call opens it again)."""
        self._session, self._decoder = None, None

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        session = self._open()
        if self._decoder is not None:
            return self._decoder.full_sequence(input_ids, attention_mask)
        return session.run([self._output], {"input_ids": input_ids, "attention_mask": attention_mask})[0]


class TorchStepper:
    """A PyTorch causal LM (the FP teacher or the fake-quantized student) with a transformers cache."""

    def __init__(self, model: TaskModel, threads: int | None = None) -> None:
        self.model, self.threads = model.eval(), threads

    def empty_past(self, batch: int) -> DynamicCache:
        return DynamicCache()

    def __call__(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, past: DynamicCache
    ) -> tuple[np.ndarray, DynamicCache]:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.model.backbone(
                input_ids=torch.from_numpy(input_ids),
                attention_mask=torch.from_numpy(attention_mask),
                position_ids=torch.from_numpy(positions),
                cache=past,
                use_cache=True,
            )
        return out.logits.float().numpy(), out.cache


Runner = TorchRunner | OrtRunner


@dataclass(frozen=True)
class Latency:
    """Latency of one model at one shape (milliseconds) and its throughput (sequences/second)."""

    batch: int
    seq_len: int
    p50_ms: float
    p90_ms: float
    throughput: float


def _random_feed(batch: int, seq_len: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab_size, size=(batch, seq_len), dtype=np.int64)
    return ids, np.ones((batch, seq_len), dtype=np.int64)


def _summary(batch: int, seq_len: int, times_ms: list[float]) -> Latency:
    p50 = float(np.median(times_ms))
    return Latency(
        batch, seq_len, round(p50, 3), round(float(np.percentile(times_ms, 90)), 3), round(batch * 1000.0 / p50, 2)
    )


def measure_latencies(
    runners: Sequence[Runner],
    shapes: Sequence[tuple[int, int]],
    warmup: int,
    repeats: int,
    vocab_size: int,
    blocks: int = 4,
) -> dict[str, list[Latency]]:
    """Median and p90 of ``repeats`` timed calls per runner and shape on fixed random ids. The runners take turns
    in ``blocks`` blocks per shape, each opened by ``warmup`` untimed calls: machine drift hits every model
    alike, and the untimed calls absorb the previous session's thread-pool spinning."""
    result: dict[str, list[Latency]] = {runner.name: [] for runner in runners}
    per_block = [repeats // blocks + (i < repeats % blocks) for i in range(blocks)]
    for batch, seq_len in shapes:
        ids, mask = _random_feed(batch, seq_len, vocab_size)
        times: dict[str, list[float]] = {runner.name: [] for runner in runners}
        for count in per_block:
            for runner in runners:
                for _ in range(warmup):
                    runner(ids, mask)
                for _ in range(count):
                    start = time.perf_counter()
                    runner(ids, mask)
                    times[runner.name].append((time.perf_counter() - start) * 1000.0)
        for runner in runners:
            result[runner.name].append(_summary(batch, seq_len, times[runner.name]))
    return result


def speedups(
    paths: dict[str, Path], shapes: Sequence[tuple[int, int]], repeats: int, vocab_size: int, threads: dict[str, int]
) -> dict[str, Any]:
    """Median latency of each graph at each shape (side by side, :func:`measure_latencies`), its speed-up over
    ``fp32`` and its file size: ``{"shapes", "p50_ms", "speedup", "size_mb"}``, shapes labelled ``b1x128``."""
    runners = [OrtRunner(name, path, threads[name]) for name, path in paths.items()]
    latencies = measure_latencies(runners, shapes, warmup=2, repeats=repeats, vocab_size=vocab_size)
    p50 = {name: {f"b{x.batch}x{x.seq_len}": x.p50_ms for x in lats} for name, lats in latencies.items()}
    return {
        "shapes": [f"b{b}x{s}" for b, s in shapes],
        "p50_ms": p50,
        "speedup": {name: {s: p50["fp32"][s] / ms for s, ms in by_shape.items()} for name, by_shape in p50.items()},
        "size_mb": {name: path.stat().st_size / 2**20 for name, path in paths.items()},
    }
