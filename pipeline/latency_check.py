"""Latency regression check: quantized/FP32 speed-up of a small fixed model against a stored baseline.

Absolute times drift 20-30% between runs on shared machines; the ratio of two models measured side by
side in one run (alternating blocks, :func:`exporters.runners.measure_latencies`) is what a code change
moves. The model is MiniLM-shaped (6 layers, hidden 384) with seeded random weights, so the check needs
no model package and no data; its quantizer ranges come from min-max on random tokens (latency does
not depend on their values). Baselines are keyed by CPU features, thread count and ONNX Runtime
version: a figure from another machine or runtime says nothing about this one.
"""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from calib.inputs import random_tokens
from calib.models import TaskModel, load_backbone
from exporters.cpu_kernels import cpu_features
from exporters.onnx_export import export_onnx, teacher_export_model
from exporters.runners import OrtRunner, measure_latencies
from pipeline.config import ActivationQuant, ModelSource, QuantConfig, RandomModel, TaskConfig, WeightQuant
from pipeline.errors import ConfigError, StageUnavailable
from pipeline.runfolder import atomic_write_text
from pipeline.stages.export import round_to_nearest_graph

CHECK_MODEL = RandomModel(
    family="bert", layers=6, hidden=384, heads=12, intermediate=1536, vocab_size=30522, max_positions=512, seed=0
)
SCHEMES = {
    "int8": QuantConfig(weights=WeightQuant(bits=8), activations=ActivationQuant(bits=8, init="minmax")),
    "int4": QuantConfig(
        weights=WeightQuant(bits=4, granularity="per-group", group_size=32), activations=ActivationQuant(bits=16)
    ),
}
SHAPES = ((1, 128), (8, 128))
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


def _shape_label(batch: int, seq_len: int) -> str:
    return f"b{batch}x{seq_len}"


def build_check_models(folder: Path) -> dict[str, Path]:
    """FP32, int8 (W8A8) and int4 (W4A16, groups of 32) ONNX files of the fixed model, as the pipeline writes them."""
    task = TaskConfig(kind="embedding")
    teacher = TaskModel(load_backbone(ModelSource(random=CHECK_MODEL), task), task.kind).eval()
    paths = {"fp32": folder / "fp32.onnx"}
    export_onnx(teacher_export_model(teacher), paths["fp32"], 17)
    batches = list(random_tokens(16, 128, CHECK_MODEL.vocab_size, seed=0).batches(8))
    for scheme, quant in SCHEMES.items():
        paths[scheme] = folder / f"{scheme}_cpu.onnx"
        onnx.save(round_to_nearest_graph(teacher, quant, batches, "cpu", 17), str(paths[scheme]))
    return paths


def measure(threads: int, repeats: int, int8_threads: int | None = None) -> Measurement:
    """Build the models in a temporary folder and measure every scheme's speed-up over FP32 side by side.

    ``int8_threads`` (default: ``threads``) exists so a test can slow the int8 path down on purpose."""
    with tempfile.TemporaryDirectory(prefix="zsaq-latency-") as tmp:
        paths = build_check_models(Path(tmp))
        counts = {name: int8_threads if name == "int8" and int8_threads else threads for name in paths}
        runners = [OrtRunner(name, path, counts[name]) for name, path in paths.items()]
        latencies = measure_latencies(runners, SHAPES, warmup=2, repeats=repeats, vocab_size=CHECK_MODEL.vocab_size)
    p50 = {name: {_shape_label(x.batch, x.seq_len): x.p50_ms for x in lats} for name, lats in latencies.items()}
    speedups = {
        scheme: {shape: round(p50["fp32"][shape] / p50[scheme][shape], 3) for shape in p50["fp32"]}
        for scheme in SCHEMES
    }
    return Measurement(machine_key(threads), speedups, p50)


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
