"""Reports for people: the validation report (JSON for scripts, Markdown and a metric / latency / size plot)
and the SAM-SGA training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

from pipeline.layout import REPORT_JSON, REPORT_MD, REPORT_PLOT

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the headless backend)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    """A self-contained Markdown report."""
    metric_name = report["metric_name"] or "task metric"
    lines = [
        f"# Validation report: {report['model']} ({report['scheme']})",
        "",
        f"- Calibration (data-free unless flagged): {report['calibration']}",
        f"- Evaluation inputs: {report['inputs']}",
    ]
    if report.get("fallback_reason"):
        lines.append(f"- No task metric: {report['fallback_reason']}; agreement is measured on generated inputs.")
    others = sorted({r["reference"] for r in report["models"]} - {report["reference"]})
    lines += [
        f"- Agreement is measured against: {report['reference']}"
        + (f" (rows marked * against {', '.join(others)})" if others else ""),
        f"- Threads: {report['threads']}; latency = median (p50) and p90 over {report['repeats']} runs after warm-up",
        "",
    ]
    shapes = [f"{b}x{s}" for b, s in report["shapes"]]
    header = ["model", "runtime", "size MB", metric_name, "argmax match", "cosine", "max |diff|"]
    header += [f"p50 ms {s}" for s in shapes] + [f"speed-up {s}" for s in shapes]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in report["models"]:
        agree = row["agreement"] or {}
        marked = row["name"] + (" *" if row["reference"] != report["reference"] else "")
        cells = [marked, row["runtime"], _fmt(row["size_mb"]), _fmt(row["metric"])]
        cells += [
            _fmt(100 * agree["argmax_match"]) + "%" if "argmax_match" in agree else "—",
            _fmt(agree.get("mean_cosine"), 5),
            _fmt(agree.get("max_abs_diff"), 4),
        ]
        cells += [_fmt(lat["p50_ms"]) for lat in row["latency"]]
        cells += [_fmt(x) + "x" if x else "—" for x in row.get("speedup_vs_fp32_onnx", [None] * len(shapes))]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("threshold_failures"):
        lines += ["", "## Threshold failures", ""] + [f"- {f}" for f in report["threshold_failures"]]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    """Metric (or agreement) against p50 latency at the first shape; marker area is the file size."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    use_metric = all(row["metric"] is not None for row in report["models"])
    for row in report["models"]:
        y = row["metric"] if use_metric else 100 * (row["agreement"] or {}).get("mean_cosine", 1.0)
        x = row["latency"][0]["p50_ms"]
        ax.scatter([x], [y], s=max(row["size_mb"], 1) * 8, alpha=0.6)
        ax.annotate(f"{row['name']}\n{row['size_mb']:.0f} MB", (x, y), fontsize=8, ha="left", va="bottom")
    b, s = report["shapes"][0]
    ax.set_xlabel(f"p50 latency, batch {b} x {s} tokens (ms)")
    ax.set_ylabel(report["metric_name"] if use_metric else "cosine with student (x100)")
    ax.set_title(f"{report['model']} {report['scheme']}: accuracy vs latency (area = size)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], folder: Path) -> None:
    """The JSON, Markdown and plot files of the validate stage (:mod:`pipeline.layout`) in ``folder``."""
    (folder / REPORT_JSON.name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / REPORT_MD.name).write_text(render_markdown(report), encoding="utf-8")
    render_plot(report, folder / REPORT_PLOT.name)


CURVES = {
    "student_discrepancy": "student (SAM descent)",
    "generator_discrepancy": "generator (ascent)",
    "prior": "generator priors",
    "sharpness": "sharpness-aware term",
}


def plot_losses(history: dict[str, Any], path: Path, title: str) -> None:
    """One line per non-empty curve of a SAM-SGA history, log scale."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in CURVES.items():
        values = history.get(key) or []
        if values:
            ax.plot(range(1, len(values) + 1), values, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
