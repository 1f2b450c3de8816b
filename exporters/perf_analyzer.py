"""Triton's load tool, ``perf_analyzer``, from the ``tritonclient`` 2.51 wheel (the bundled server's version).

It is a C++ binary built for CUDA machines: even on a CPU machine it links ``libcudart.so.12`` (from the
``nvidia-cuda-runtime-cu12`` wheel, put on ``LD_LIBRARY_PATH`` here) and ``libb64.so.0d`` (Debian's
``libb64-0d``). Each load level is perf_analyzer's own stabilised measurement: time windows at a fixed
concurrency until three in a row agree within the stability percentage, at most ``trials`` windows. (Its
``--request-count`` mode is bounded too, but rounds the measured duration to whole seconds.)"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from calib.errors import StageUnavailable

MISSING_LIBRARY = re.compile(r"error while loading shared libraries: (\S+?):")
INSTALL_HINT = {
    "libcudart.so.12": "pip install nvidia-cuda-runtime-cu12",
    "libb64.so.0d": "apt-get install libb64-0d",
}


def _cuda_runtime_lib() -> str | None:
    spec = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "lib")


@functools.cache
def perf_analyzer() -> tuple[Path, dict[str, str]]:
    """The binary and the environment it starts in; a one-line StageUnavailable naming what is missing."""
    found = Path(sys.executable).parent / "perf_analyzer"
    binary = found if found.is_file() else Path(shutil.which("perf_analyzer") or "perf_analyzer")
    env = dict(os.environ)
    cuda = _cuda_runtime_lib()
    if cuda:
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (cuda, env.get("LD_LIBRARY_PATH", "")) if p)
    try:
        probe = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise StageUnavailable("perf_analyzer is missing: pip install --no-deps tritonclient==2.51.0") from None
    missing = MISSING_LIBRARY.search(probe.stderr)
    if missing:
        library = missing.group(1)
        hint = INSTALL_HINT.get(library, "install it")
        raise StageUnavailable(f"perf_analyzer cannot start: {library} is missing ({hint})")
    return binary, env


def write_input_data(path: Path, texts: list[str], input_name: str, extra: dict[str, int] | None = None) -> Path:
    """perf_analyzer's ``--input-data`` file: one step per text, each a [1] BYTES tensor, and the same [1] value
    of each ``extra`` input in every step."""
    steps = [{input_name: [text], **{name: [value] for name, value in (extra or {}).items()}} for text in texts]
    path.write_text(json.dumps({"data": steps}), encoding="utf-8")
    return path


@dataclass
class Measurement:
    """One load level as perf_analyzer measured it (client side: latencies; server side: the queue/compute
    split from Triton's statistics)."""

    protocol: str
    model: str
    concurrency: int
    completed: bool  # perf_analyzer ran to its end: no failed request, a stable measurement
    error: str | None = None
    throughput: float | None = None  # inferences per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None  # compute input + infer + output

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def _last_error(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if "rror" in line or "ailed" in line]
    return (lines or [line.strip() for line in output.splitlines() if line.strip()] or ["no output"])[-1]


@dataclass(frozen=True)
class Windows:
    """perf_analyzer's time windows: their length, the stability it asks of three in a row, the most it tries."""

    window_ms: int = 2000
    stability_percent: float = 30.0
    trials: int = 6

    def args(self) -> list[str]:
        """Its command-line arguments."""
        return [
            f"--measurement-interval={self.window_ms}",
            f"--stability-percentage={self.stability_percent}",
            f"--max-trials={self.trials}",
        ]

    def time_limit_s(self) -> float:
        """A wall-clock bound for one level (warm-up and start-up included)."""
        return 2.0 * self.trials * self.window_ms / 1000.0 + 60.0


def measure(
    url: str, protocol: str, model: str, concurrency: int, data: Path, input_name: str, csv_path: Path, windows: Windows
) -> Measurement:
    """Synchronous clients at ``concurrency``, each sending one text per request, cycling through ``data``."""
    binary, env = perf_analyzer()
    command = [
        str(binary),
        *("-m", model, "-u", url, "-i", protocol, "-f", str(csv_path)),
        f"--concurrency-range={concurrency}:{concurrency}",
        f"--input-data={data}",
        f"--shape={input_name}:1",
        *windows.args(),
    ]
    result = Measurement(protocol, model, concurrency, completed=False)
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=windows.time_limit_s())
    except subprocess.TimeoutExpired:
        result.error = f"not done within {windows.time_limit_s():.0f} s"
        return result
    if run.returncode != 0:
        result.error = _last_error(run.stdout + run.stderr)
        return result
    with open(csv_path, encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    compute = ("Server Compute Input", "Server Compute Infer", "Server Compute Output")
    result.completed = True
    result.throughput = round(float(row["Inferences/Second"]), 1)
    result.p50_ms = round(float(row["p50 latency"]) / 1000.0, 2)
    result.p99_ms = round(float(row["p99 latency"]) / 1000.0, 2)
    result.queue_ms = round(float(row["Server Queue"]) / 1000.0, 2)
    result.compute_ms = round(sum(float(row[k]) for k in compute) / 1000.0, 2)
    return result
