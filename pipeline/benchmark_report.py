"""Render the comparison table from the benchmark's cell files: Markdown, CSV and a PNG plot."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import matplotlib
import onnxruntime as ort
import torch

from calib.errors import ConfigError
from exporters.cpu_kernels import machine_description
from pipeline.benchmark import CELLS_DIR, LATENCY_CELL, BenchSpec, BenchTask, read_cells, task_config
from pipeline.benchmark_rows import Row, task_family
from pipeline.config import PipelineConfig, load_config
from pipeline.runfolder import atomic_write_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the headless backend)

LOWER_IS_BETTER = {"perplexity"}
FIDELITY_NAMES = {
    "embedding": "cosine to FP x100",
    "classification": "agreement with FP %",
    "causal-lm": "agreement with FP %",
}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std_text(values: list[float]) -> str:
    """``86.43 ± 0.46`` (one value: ``86.43``)."""
    mean, std = mean_std(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {std:.2f}"


def _metric_text(values: list[float], planned: int) -> str:
    text = mean_std_text(values)
    return text if len(values) == planned else f"{text} ({len(values)}/{planned} seeds)"


class TableData:
    """Cells grouped by (task, row), the latency file, and what each missing figure is missing for."""

    def __init__(self, spec: BenchSpec, out: Path) -> None:
        self.spec, self.out = spec, out
        self.cells = read_cells(spec, out)
        latency_file = out / CELLS_DIR / LATENCY_CELL
        self.latency: dict[str, Any] | None = None
        if latency_file.is_file():
            self.latency = json.loads(latency_file.read_text(encoding="utf-8"))
            if not isinstance(self.latency, dict) or "speedup" not in self.latency:
                raise ConfigError(f"{latency_file}: not a latency cell; delete it to measure again")
        configs = {task.name: task_config(spec, task) for task in spec.tasks}
        self.families = {name: task_family(config) for name, config in configs.items()}
        self.metrics = {name: config.task.eval.metric for name, config in configs.items()}
        self.kinds = {name: config.task.kind for name, config in configs.items()}
        if spec.average is not None and LOWER_IS_BETTER & set(self.metrics.values()):
            raise ConfigError(f"{spec.path}: average: expected tasks whose metrics are all higher-is-better")

    def metric_cell(self, row: Row, task_name: str, field: str = "metric") -> str:
        """The figure (``metric``, ``fidelity`` or ``exported_metric``) for one row and task, or why there is
        none."""
        task = next(t for t in self.spec.tasks if t.name == task_name)
        reason = row.reason_not_run(self.families[task_name])
        if reason is not None:
            return reason if reason == "n/a" else f"not run: {reason}"
        if row.uses_data and task.real_data is None:
            return "not run: the spec gives no real_data file"
        results = self.cells.get((task_name, row.key), [])
        failure = self.out / CELLS_DIR / f"{task_name}__{row.key}__s{task.seeds[0]}.error.txt"
        if not results:
            return f"failed: {failure.read_text().strip()}" if failure.is_file() else "pending"
        values = [r[field] for r in results if r.get(field) is not None]
        if values:
            return _metric_text(values, len(task.seeds) if row.seeded else 1)
        errors = [r["exported_error"] for r in results if field == "exported_metric" and "exported_error" in r]
        return f"not exported: {errors[0]}" if errors else "not recorded"

    def values(self, row: Row, task_name: str) -> dict[int, float]:
        """Every seed's metric of one row on one task, by seed."""
        return {r["seed"]: r["metric"] for r in self.cells.get((task_name, row.key), [])}

    def average_values(self, row: Row) -> dict[int, float]:
        """The row's mean over every task, by seed, for the seeds it has on all tasks (an unseeded row: its one
        value per task); empty while any task lacks a figure."""
        per_task = [self.values(row, task.name) for task in self.spec.tasks]
        if not all(per_task):
            return {}
        if not row.seeded:
            return {0: statistics.mean(values[min(values)] for values in per_task)}
        seeds = sorted(set.intersection(*(set(values) for values in per_task)))
        return {seed: statistics.mean(values[seed] for values in per_task) for seed in seeds}

    def average_cell(self, row: Row) -> str:
        """The average column's figure for one row, or why there is none."""
        if any(row.reason_not_run(self.families[t.name]) is not None for t in self.spec.tasks):
            return "n/a"
        values = list(self.average_values(row).values())
        if not values:
            return "pending"
        planned = len(set.intersection(*(set(t.seeds) for t in self.spec.tasks))) if row.seeded else 1
        return _metric_text(values, planned)

    @property
    def shapes(self) -> list[str]:
        """The timed shapes (``b1x128``), from the latency file or the latency config (none without one)."""
        if self.latency is not None:
            return self.latency["shapes"]
        if self.spec.latency_config is None:
            return []
        return [f"b{b}x{s}" for b, s in load_config(self.spec.latency_config).validate.shapes]

    def format_figures(self, row: Row) -> list[str]:
        """Speed-up at each timed shape, and size (MB and % of FP32), of the row's CPU format (none without a
        latency model in the spec)."""
        if self.spec.latency_config is None:
            return []
        fmt = row.latency_format
        if fmt is None:
            return ["n/a (PyTorch only)"] + ["n/a"] * len(self.shapes)
        reason = (self.latency or {}).get("unavailable", {}).get(fmt)
        if reason is not None:
            return [f"not run: {reason}"] + ["n/a"] * len(self.shapes)
        if self.latency is None or fmt not in self.latency["speedup"]:
            return ["pending"] * (len(self.shapes) + 1)
        speed = self.latency["speedup"][fmt]
        size, fp32 = self.latency["size_mb"][fmt], self.latency["size_mb"]["fp32"]
        return [*(f"{speed[shape]:.2f}x" for shape in self.shapes), f"{size:.1f} ({100 * size / fp32:.0f}%)"]

    def cost(self, row: Row) -> tuple[str, str]:
        """Minutes (mean over seeds) and peak memory (largest over seeds) per task, ``/``-separated in task order."""
        minutes, peaks = [], []
        for task in self.spec.tasks:
            results = self.cells.get((task.name, row.key), [])
            minutes.append(f"{statistics.mean(r['minutes'] for r in results):.1f}" if results else "–")
            peaks.append(f"{max(r['peak_gib'] for r in results):.1f}" if results else "–")
        return " / ".join(minutes), " / ".join(peaks)


def _header(data: TableData) -> list[str]:
    tasks = " / ".join(t.name for t in data.spec.tasks)
    columns = [t.column for t in data.spec.tasks] + ([data.spec.average] if data.spec.average else [])
    if data.spec.fidelity:
        columns += [f"{t.name}: {FIDELITY_NAMES[data.kinds[t.name]]}" for t in data.spec.tasks]
    if data.spec.exported:
        columns += [f"{t.column}, exported CPU ONNX" for t in data.spec.tasks]
    speedups = [f"speed-up {shape}" for shape in data.shapes] + (["size MB (% FP32)"] if data.shapes else [])
    return ["method", "scheme", "data-free", *columns, *speedups, f"minutes ({tasks})", f"peak GiB ({tasks})"]


def table_rows(data: TableData) -> list[list[str]]:
    """One list of strings per row of the table, in the spec's row order."""
    fields = ["metric", *(["fidelity"] if data.spec.fidelity else [])]
    fields += ["exported_metric"] if data.spec.exported else []
    rows = []
    for row in data.spec.rows:
        figures = [data.metric_cell(row, t.name, f) for f in fields for t in data.spec.tasks]
        if data.spec.average:
            figures.insert(len(data.spec.tasks), data.average_cell(row))
        minutes, peak = data.cost(row)
        rows.append([row.label, row.scheme, "no (uses data)" if row.uses_data else "yes", *figures,
                     *data.format_figures(row), minutes, peak])  # fmt: skip
    return rows


def _claims(data: TableData, average_only: bool = False) -> list[str]:
    """The spec's comparisons on each task (and on the average; ``average_only``: on the average alone, where
    the spec has one), computed from the cells (not typed in), paired by seed."""
    by_key = {r.key: r for r in data.spec.rows}
    columns = [(t.name, data.metrics[t.name], lambda row, name=t.name: data.values(row, name)) for t in data.spec.tasks]
    if average_only and data.spec.average:
        columns = []
    if data.spec.average:
        columns.append((data.spec.average, "average", data.average_values))
    lines = []
    for name, metric, values in columns:
        units = f" {metric} (lower is better)" if metric in LOWER_IS_BETTER else " points"
        for ours, theirs in data.spec.claims:
            a, b = values(by_key[ours]), values(by_key[theirs])
            if not (a and b):
                continue
            delta = statistics.mean(a.values()) - statistics.mean(b.values())
            if by_key[theirs].seeded:  # paired only where both have the seed
                paired = [a[seed] - b[seed] for seed in sorted(a) if seed in b]
            else:  # an unseeded row: its one value against every seed
                paired = [a[seed] - b[min(b)] for seed in sorted(a)]
            lines.append(
                f"- {name}: {by_key[ours].label} {by_key[ours].scheme} vs {by_key[theirs].label} "
                f"{by_key[theirs].scheme}: {delta:+.2f}{units} (by seed: {', '.join(f'{d:+.2f}' for d in paired)})"
            )
    return lines


def _model_label(config: PipelineConfig) -> str:
    """The model as the config names it, a local folder relative to the working directory."""
    if config.model.path is not None:
        return os.path.relpath(config.model.path)
    return config.model.describe()


def _protocol(spec: BenchSpec, task: BenchTask) -> str:
    """How one task's column was measured."""
    config = task_config(spec, task)
    calib, ev, weights = config.calib, config.task.eval, config.quant.weights
    data = Path(ev.data).name
    if ev.metric == "perplexity":
        window = max(s for _, s in config.validate.shapes)
        data += f" (first {ev.limit} non-overlapping windows of {window} tokens)"
    groups = f" (groups of {weights.group_size})" if weights.group_size else ""
    return (
        f"`{task.config.name}`, model {_model_label(config)}, {ev.metric} on {data}; seeds {list(task.seeds)}; "
        f"calibration {calib.samples} samples x {calib.seq_len} tokens, {calib.sam_sga.rounds} student steps for "
        f"every learning method; weights {weights.granularity}{groups}."
    )


def _machines(data: TableData) -> str:
    """Which machines the cells ran on, with counts (cells made before cells recorded it: 'not recorded')."""
    cells = [cell for results in data.cells.values() for cell in results]
    if data.latency is not None:
        cells.append(data.latency)
    counts = Counter(str(cell.get("machine", "not recorded")) for cell in cells)
    return "; ".join(f"{label} ({n} cells)" for label, n in sorted(counts.items())) or "none yet"


def _latency_protocol(data: TableData) -> list[str]:
    if data.spec.latency_config is None:
        return []
    machine = (data.latency or {}).get("machine", "a machine its cell does not record")
    return [
        "- Speed-up and size: the CPU ONNX model of each scheme, built from the latency model "
        f"(`{data.spec.latency_config.name}`), timed against its FP32 ONNX side by side in one run on {machine} "
        "(alternating blocks, medians): speed and size belong to that encoder, for every task's row. W4A8 (int4 "
        "per channel) runs on the int8 kernel, its integers stored as int8; W4A16 is MatMulNBits with groups of 32 "
        "and an int8 embedding table; W2A8 (per channel, static int8 inputs) has no runtime that executes it "
        "(PyTorch student only; ONNX Runtime runs 2-bit weights only as MatMulNBits)."
    ]


def render_markdown(data: TableData, command: str, brief: bool = False) -> str:
    """The table, how it was made, and the protocol. ``brief`` (the README's block): a spec with an average
    compares on the average alone and points to ``table.md`` for each task's comparisons."""
    header = _header(data)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(data)]
    threads = (data.latency or {}).get("threads", "?")
    timed = f", {threads} threads for latency" if data.spec.latency_config is not None else ""
    proto = [f"- **{task.name}**: {_protocol(data.spec, task)}" for task in data.spec.tasks]
    fidelity = (
        ["- Fidelity: on the same evaluation inputs, the share of predictions equal to the FP model's (cosine to "
         "its outputs for embedding models): a task metric moves both ways as predictions flip; fidelity counts "
         "every flip."] if data.spec.fidelity else []
    )  # fmt: skip
    exported = (
        ["- Exported CPU ONNX: the same metric on the same inputs from the graph the export stage writes for the "
         "row's model (a student's CPU flavour from its contract, run by ONNX Runtime's CPU kernels; the FP32 "
         "graph for FP32; a peer's row is its ONNX graph already)."] if data.spec.exported else []
    )  # fmt: skip
    return "\n".join(
        [
            f"# Benchmark: data-free quantization against the field ({date.today().isoformat()})",
            "",
            f"Made by `{command}`. Rendered on {machine_description()}, ONNX Runtime {ort.__version__}, "
            f"torch {torch.__version__}{timed}. Metrics: mean ± std over seeds; every figure comes from "
            f"a cell file under `{CELLS_DIR}/`. Cells ran on: {_machines(data)}.",
            "",
            *lines,
            "",
            "Comparisons (mean over seeds, and the paired difference of each seed"
            + ("; each task's in [table.md](table.md)):" if brief and data.spec.average else "):"),
            *(_claims(data, average_only=brief) or ["- pending"]),
            "",
            "Protocol:",
            *proto,
            *_latency_protocol(data),
            *fidelity,
            *exported,
            "- 'n/a' in a task's column: the row is not benchmarked on that task's model family (encoder or decoder; "
            f"each row names its families in `{os.path.relpath(data.spec.catalogue)}`).",
            "- Rows marked 'uses data' calibrate on the task's training split: an upper bound, not a data-free result. "
            "Nothing is selected on an evaluation split.",
            "",
            "![benchmark](table.png)",
            "",
        ]
    )


def render_csv(data: TableData) -> str:
    """One line per row and task, with the raw per-seed values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    speed_columns = [f"speedup_{shape}" for shape in data.shapes]
    writer.writerow(["row", "label", "scheme", "uses_data", "task", "metric", "mean", "std", "seeds", "values",
                     "fidelity_mean", "exported_mean", "minutes_mean", "peak_gib", *speed_columns,
                     "size_mb"])  # fmt: skip
    for row in data.spec.rows:
        fmt = row.latency_format
        speed = (data.latency or {}).get("speedup", {}).get(fmt, {})
        size = (data.latency or {}).get("size_mb", {}).get(fmt)
        for task in data.spec.tasks:
            results = data.cells.get((task.name, row.key), [])
            if not results:
                continue
            mean, std = mean_std([r["metric"] for r in results])
            fidelity = [r["fidelity"] for r in results if r.get("fidelity") is not None]
            exported = [r["exported_metric"] for r in results if r.get("exported_metric") is not None]
            writer.writerow([
                row.key, row.label, row.scheme, row.uses_data, task.name, data.metrics[task.name],
                f"{mean:.4f}", f"{std:.4f}", len(results), " ".join(f"{r['metric']:.4f}" for r in results),
                f"{statistics.mean(fidelity):.4f}" if fidelity else "",
                f"{statistics.mean(exported):.4f}" if exported else "",
                f"{statistics.mean(r['minutes'] for r in results):.3f}", f"{max(r['peak_gib'] for r in results):.3f}",
                *(f"{speed[shape]:.3f}" if shape in speed else "" for shape in data.shapes),
                "" if size is None else f"{size:.2f}",
            ])  # fmt: skip
    return buffer.getvalue()


def _plot_task(ax: plt.Axes, data: TableData, task: BenchTask) -> None:
    """Each row's mean ± std as a point; FP32 as a dashed line; points far below FP32 clipped and labelled."""
    lower_better = data.metrics[task.name] in LOWER_IS_BETTER
    points, fp32 = [], None
    for row in data.spec.rows:
        values = list(data.values(row, task.name).values())
        if not values:
            continue
        mean, std = mean_std(values)
        if row.method == "fp32":
            fp32 = mean
            continue
        color = "tab:red" if row.method == "zsaq" else "tab:gray" if row.uses_data else "tab:blue"
        points.append((f"{row.label} {row.scheme}", mean, std, color))
    if fp32 is not None:
        ax.axvline(fp32, color="black", linestyle="--", linewidth=1, label=f"FP32 {fp32:.2f}")
        ax.legend(fontsize=8, loc="lower right" if lower_better else "lower left")
    if lower_better:
        ax.set_xscale("log")
    # a catastrophic row (e.g. W2A8 at chance) would squeeze every other difference into one pixel
    limit = None if fp32 is None or lower_better else fp32 - 6.0
    for y, (_, mean, std, color) in enumerate(points):
        shown = mean if limit is None else max(mean, limit)
        ax.errorbar(shown, y, xerr=std if shown == mean else None, fmt="o", color=color, capsize=3)
        if shown != mean:
            ax.annotate(f"{mean:.1f} (off scale)", (shown, y), xytext=(6, -3), textcoords="offset points", fontsize=7)
    ax.set_yticks(range(len(points)), [p[0] for p in points], fontsize=7)
    ax.set_ylim(len(points) - 0.5, -0.5)
    arrow = "lower is better" if lower_better else "higher is better"
    ax.set_title(f"{task.column} ({arrow})", fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def render_plot(data: TableData, path: Path) -> None:
    """One panel per task (mean ± std over seeds per row)."""
    tasks = data.spec.tasks
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 7), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        _plot_task(ax, data, task)
    fig.suptitle("red: ZSAQ, blue: data-free baselines, gray: uses real data; bars: std over seeds", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


MAIN_TABLE = "table"  # the spec bench/table.yaml fills the README's plain bench-table block


def readme_markers(spec_path: Path) -> tuple[str, str]:
    """The README block a spec's table goes into: ``bench-table`` for bench/table.yaml, ``bench-table:<stem>``
    for any other spec (bench/decoders.yaml: ``bench-table:decoders``), so several tables live in one README."""
    name = "bench-table" if spec_path.stem == MAIN_TABLE else f"bench-table:{spec_path.stem}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def check_readme(readme: Path, spec_path: Path) -> str:
    """The README's text; a one-line error when it lacks the block the spec's table goes into."""
    start, end = readme_markers(spec_path)
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if start not in text or end not in text:
        raise ConfigError(f"bench --readme: {readme} has no '{start}' ... '{end}' block to fill")
    return text


def update_readme(readme: Path, spec_path: Path, table_markdown: str, out: Path) -> None:
    """Replace the README's block of this spec (:func:`readme_markers`) with the table (links made relative)."""
    text = check_readme(readme, spec_path)
    start, end = readme_markers(spec_path)
    relative = Path(os.path.relpath(out.resolve(), readme.resolve().parent)).as_posix()
    body = table_markdown.replace("](table.", f"]({relative}/table.").replace("# Benchmark", "### Benchmark", 1)
    body = body.replace(f"under `{CELLS_DIR}/`", f"under `{relative}/{CELLS_DIR}/`")
    head, rest = text.split(start, 1)
    atomic_write_text(readme, head + start + "\n" + body.strip() + "\n" + end + rest.split(end, 1)[1])


def write_reports(spec: BenchSpec, out: Path, command: str, readme: Path | None = None) -> Path:
    """``table.md``, ``table.csv`` and ``table.png`` in ``out`` (and the README's table block when given);
    returns the Markdown path."""
    data = TableData(spec, out)
    render_plot(data, out / "table.png")
    atomic_write_text(out / "table.csv", render_csv(data))
    markdown = render_markdown(data, command)
    atomic_write_text(out / "table.md", markdown)
    if readme is not None:
        update_readme(readme, spec.path, render_markdown(data, command, brief=True), out)
    return out / "table.md"
