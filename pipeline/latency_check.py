"""Latency regression check: quantized/FP32 speed-ups of a fixed MiniLM-shaped random model, timed side by
side, against a baseline keyed by CPU features, threads and ONNX Runtime version (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import onnxruntime as ort

from calib.config import ModelSource, RandomModel, TaskConfig
from calib.errors import ConfigError, StageUnavailable
from calib.models import frozen_teacher, load_backbone
from exporters.cpu_kernels import cpu_features
from exporters.graphs import cpu_format_graphs
from exporters.runners import speedups
from pipeline.runfolder import atomic_write_text

CHECK_MODEL = RandomModel(
    family="bert", layers=6, hidden=384, heads=12, intermediate=1536, vocab_size=30522, max_positions=512, seed=0
)
SCHEMES = {"int8": "w8a8", "int4": "w4a16"}  # the check's names -> the CPU formats (exporters.graphs)
SHAPES = ((1, 128), (8, 128))
RECORD_RUNS = 3  # measurements whose per-cell medians --record stores
DEFAULT_THREADS = 1  # on a shared 2-vCPU host a neighbour that takes a core stalls a two-thread session at every
# barrier, short int8 kernels most (b1 int8 speed-ups 1.5x-3.2x across two-thread runs on one day, 2.2x-2.4x with
# one thread); the check guards the graphs' kernels, not thread scaling
DEFAULT_TOLERANCE = 0.3  # a speed-up may fall this fraction below the baseline before the check fails (ratios
# moved by up to ~20% between runs here when the shared machine was busy)


def machine_key(threads: int) -> str:
    """What a latency ratio depends on: CPU architecture and SIMD features, threads, ONNX Runtime."""
    return f"{platform.machine()} {cpu_features()} | {threads} threads | onnxruntime {ort.__version__}"


@dataclass(frozen=True)
class Measurement:
    """Speed-ups over FP32 (``{scheme: {shape: ratio}}``) and the medians they came from (ms)."""

    key: str
    speedups: dict[str, dict[str, float]]
    p50_ms: dict[str, dict[str, float]]


def measure(threads: int, repeats: int, rewrite_int8: Callable[[Path], None] | None = None) -> Measurement:
    """Build the models in a temporary folder and measure every scheme's speed-up over FP32 side by side.

    ``rewrite_int8`` (edits the int8 graph file in place before timing) exists so a test can slow the int8 path
    down on purpose by a known factor on any CPU."""
    task = TaskConfig(kind="embedding")
    teacher = frozen_teacher(load_backbone(ModelSource(random=CHECK_MODEL), task), task.kind)
    with tempfile.TemporaryDirectory(prefix="zsaq-latency-") as tmp:
        paths = cpu_format_graphs(teacher, tuple(SCHEMES.values()), Path(tmp), 17, max(s for _, s in SHAPES))
        if rewrite_int8 is not None:
            rewrite_int8(paths[SCHEMES["int8"]])
        result = speedups(paths, SHAPES, repeats, CHECK_MODEL.vocab_size, dict.fromkeys(paths, threads))
    names = {"fp32": "fp32", **{fmt: scheme for scheme, fmt in SCHEMES.items()}}
    speedup = {names[f]: {s: round(r, 3) for s, r in by_shape.items()} for f, by_shape in result["speedup"].items()}
    del speedup["fp32"]
    return Measurement(machine_key(threads), speedup, {names[f]: ms for f, ms in result["p50_ms"].items()})


def median_measurement(measurements: Sequence[Measurement]) -> Measurement:
    """Per scheme and shape, the median speed-up and median latency of several measurements of one machine: what
    ``--record`` stores, since one measurement on a shared machine can land in a fast or a slow phase."""
    if not measurements or len({m.key for m in measurements}) != 1:
        raise ValueError("median_measurement needs one or more measurements of one machine key")
    speedups = _cellwise_median([m.speedups for m in measurements])
    return Measurement(measurements[0].key, speedups, _cellwise_median([m.p50_ms for m in measurements]))


def _cellwise_median(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """``{name: {shape: value}}`` tables of one layout reduced to the median of each cell."""
    return {
        name: {shape: round(statistics.median(t[name][shape] for t in tables), 3) for shape in shapes}
        for name, shapes in tables[0].items()
    }


def read_baseline(path: Path) -> dict[str, Any]:
    """The baseline file (an empty one when it does not exist yet); a corrupt file is a one-line error."""
    if not path.exists():
        return {"tolerance": DEFAULT_TOLERANCE, "entries": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON baseline ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise ConfigError(f"{path}: expected a JSON object with an 'entries' object (written by bench --record)")
    return data


def baseline_entry(baseline: dict[str, Any], key: str, baseline_name: str) -> dict[str, Any]:
    """This machine's entry; a one-line error naming the command that records one when there is none."""
    entry = baseline["entries"].get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("speedups"), dict):
        raise StageUnavailable(
            f"{baseline_name} has no baseline for '{key}'; "
            f"record one on this machine with: zsaq-pipeline bench --record {baseline_name}"
        )
    return entry


def compare(measured: Measurement, baseline: dict[str, Any], baseline_name: str) -> list[str]:
    """Regressions, one line each with both figures (a speed-up more than the tolerance below its baseline)."""
    entry = baseline_entry(baseline, measured.key, baseline_name)
    tolerance = float(baseline.get("tolerance", DEFAULT_TOLERANCE))
    failures = []
    for scheme, shapes in entry["speedups"].items():
        for shape, expected in shapes.items():
            got = measured.speedups.get(scheme, {}).get(shape)
            if got is None:
                failures.append(f"{scheme} {shape}: not measured (baseline {expected:.2f}x)")
            elif got < expected * (1 - tolerance):
                failures.append(
                    f"{scheme} {shape}: {got:.2f}x faster than FP32, baseline {expected:.2f}x "
                    f"(more than {tolerance:.0%} slower)"
                )
    return failures


def record(measured: Measurement, baseline: dict[str, Any], path: Path) -> None:
    """Store this machine's speed-ups as its baseline entry (other machines' entries are kept)."""
    baseline.setdefault("tolerance", DEFAULT_TOLERANCE)
    baseline["entries"][measured.key] = {
        "speedups": measured.speedups,
        "p50_ms": measured.p50_ms,
        "recorded": date.today().isoformat(),
    }
    atomic_write_text(path, json.dumps(baseline, indent=2, sort_keys=True) + "\n")


def render(measured: Measurement, baseline: dict[str, Any]) -> str:
    """A Markdown table: medians, measured speed-ups and the baseline's, per scheme and shape."""
    entry = baseline["entries"].get(measured.key, {}).get("speedups", {})
    lines = [
        f"machine: {measured.key}",
        "| scheme | shape | FP32 p50 ms | p50 ms | speed-up | baseline |",
        "|---|---|---|---|---|---|",
    ]
    for scheme, shapes in measured.speedups.items():
        for shape, ratio in shapes.items():
            expected = entry.get(scheme, {}).get(shape)
            lines.append(
                f"| {scheme} | {shape} | {measured.p50_ms['fp32'][shape]:.2f} | {measured.p50_ms[scheme][shape]:.2f} "
                f"| {ratio:.2f}x | {f'{expected:.2f}x' if expected else '—'} |"
            )
    return "\n".join(lines)
