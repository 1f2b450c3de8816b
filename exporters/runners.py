"""One calling convention for every model validation compares: ``runner(ids, mask) -> np.ndarray``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from calib.models import TaskModel


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
    """An ONNX model on ONNX Runtime's CPU provider (the provider actually used is recorded)."""

    def __init__(self, name: str, path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name, self.size_bytes, self.threads = name, path.stat().st_size, threads
        self.runtime = f"onnxruntime {ort.__version__} ({self.session.get_providers()[0]})"

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]


@dataclass(frozen=True)
class Latency:
    """Latency of one model at one shape (milliseconds) and its throughput (sequences/second)."""

    batch: int
    seq_len: int
    p50_ms: float
    p90_ms: float
    throughput: float


def measure_latency(runner, batch: int, seq_len: int, warmup: int, repeats: int, vocab_size: int) -> Latency:  # noqa: ANN001
    """Median and p90 over ``repeats`` timed calls after ``warmup`` untimed ones, on fixed random ids."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab_size, size=(batch, seq_len), dtype=np.int64)
    mask = np.ones((batch, seq_len), dtype=np.int64)
    for _ in range(warmup):
        runner(ids, mask)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(ids, mask)
        times.append((time.perf_counter() - start) * 1000.0)
    p50 = float(np.median(times))
    return Latency(
        batch, seq_len, round(p50, 3), round(float(np.percentile(times, 90)), 3), round(batch * 1000.0 / p50, 2)
    )
