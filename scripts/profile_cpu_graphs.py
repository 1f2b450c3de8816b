"""Where the time goes in a run's CPU graphs: ONNX Runtime's own profiler on the student's CPU flavour beside
ONNX Runtime's ``quantize_dynamic`` graph (and any other graph named), kernel time per operator type at each
batch, plus the median latency of the same calls. Graphs take turns in blocks, one session alive at a time (a
session's idle thread pool spins and would slow the next one). Prints a Markdown table; ``--out`` also writes it
with the raw per-op figures as JSON. Usage (an otherwise idle machine):

    python scripts/profile_cpu_graphs.py runs/minilm --out docs/profile_minilm
"""

from __future__ import annotations

import collections
import gc
import json
import statistics
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from exporters.cpu_kernels import machine_description
from pipeline.layout import ORT_DYNAMIC_ONNX, STUDENT_ONNX
from pipeline.runfolder import atomic_write_text

TOP_OPS = 8


def _session(path: Path, threads: int, profile_prefix: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """Fixed ids inside every encoder vocabulary here (latency does not depend on their values)."""
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, seq_len)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _op_times(profile: Path, calls: int) -> dict[str, float]:
    """Kernel milliseconds per call by operator type, from one profile file."""
    totals: dict[str, float] = collections.Counter()
    for event in json.loads(profile.read_text(encoding="utf-8")):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000.0
    return {op: ms / calls for op, ms in totals.items()}


def profile_graph(path: Path, batch: int, seq_len: int, threads: int, repeats: int, tmp: Path) -> dict:
    """Median latency and per-op kernel time of ``repeats`` calls (after 3 untimed ones)."""
    session = _session(path, threads, tmp / f"{path.stem}_b{batch}")
    feeds = _feeds(batch, seq_len)
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    profile = Path(session.end_profiling())
    ops = _op_times(profile, repeats + 3)
    profile.unlink()
    del session
    gc.collect()
    return {"p50_ms": statistics.median(times), "ops_ms": ops}


def markdown(results: dict[str, dict[int, dict]], batches: tuple[int, ...], machine: str) -> str:
    """One table per batch: the graphs' medians and their heaviest operator types side by side."""
    lines = [f"Profiled on {machine}; kernel milliseconds per call by operator type (ONNX Runtime's profiler).", ""]
    names = list(results)
    for batch in batches:
        ops = collections.Counter()
        for name in names:
            ops.update(results[name][batch]["ops_ms"])
        top = [op for op, _ in ops.most_common(TOP_OPS)]
        lines += [f"### batch {batch}", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines.append("| median ms | " + " | ".join(f"{results[n][batch]['p50_ms']:.2f}" for n in names) + " |")
        for op in top:
            cells = [f"{results[n][batch]['ops_ms'].get(op, 0.0):.2f}" for n in names]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
        rest = [sum(v for k, v in results[n][batch]["ops_ms"].items() if k not in top) for n in names]
        lines += ["| other ops | " + " | ".join(f"{v:.2f}" for v in rest) + " |", ""]
    return "\n".join(lines)


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--graph", "extra", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Another ONNX graph to profile beside them (repeatable).")  # fmt: skip
@click.option("--batches", default="1,8", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1), help="Turns each graph takes.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder for profile.md and .json.")
def main(
    run: Path, extra: tuple[Path, ...], batches: str, seq_len: int, threads: int, repeats: int, rounds: int, out: Path
) -> None:
    """Profile RUN's CPU-flavour student beside its quantize_dynamic graph (and --graph ones)."""
    sizes = tuple(int(b) for b in batches.split(","))
    graphs = [run / "export" / STUDENT_ONNX["cpu"].name, run / "export" / ORT_DYNAMIC_ONNX.name, *extra]
    missing = [str(g) for g in graphs if not g.is_file()]
    if missing:
        raise click.ClickException(f"no such graph: {', '.join(missing)} (run the export stage first)")
    names = {g: f"{g.parents[1].name}:{g.stem}" for g in graphs}  # run:graph, so two runs' students stay apart
    if len(set(names.values())) < len(names):
        raise click.ClickException("two graphs share a run folder and a name; profile them one at a time")
    runs: dict[str, dict[int, list[dict]]] = {names[g]: {b: [] for b in sizes} for g in graphs}
    scratch = (out or run) / ".profile"
    scratch.mkdir(parents=True, exist_ok=True)
    for turn in range(rounds):
        for graph in graphs if turn % 2 == 0 else graphs[::-1]:
            for batch in sizes:
                runs[names[graph]][batch].append(profile_graph(graph, batch, seq_len, threads, repeats, scratch))
    scratch.rmdir()
    results = {
        name: {
            b: {
                "p50_ms": statistics.median(r["p50_ms"] for r in turns),
                "ops_ms": {op: statistics.mean(r["ops_ms"].get(op, 0.0) for r in turns) for op in turns[0]["ops_ms"]},
            }
            for b, turns in by_batch.items()
        }
        for name, by_batch in runs.items()
    }
    text = markdown(results, sizes, machine_description())
    click.echo(text)
    if out is not None:
        atomic_write_text(out / "profile.md", text + "\n")
        atomic_write_text(out / "profile.json", json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
