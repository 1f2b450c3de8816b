"""Reports for people: the validation report (JSON for scripts, Markdown and a metric / latency / size plot)
and the SAM-SGA training curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

from pipeline.layout import REPORT_JSON, REPORT_MD, REPORT_PLOT, SERVE_LOAD, SERVE_PLOT, SERVE_REPORT
from pipeline.runfolder import atomic_write_text

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
    if report.get("decoding"):
        lines += _decoding_section(report["decoding"])
    if report.get("threshold_failures"):
        lines += ["", "## Threshold failures", ""] + [f"- {f}" for f in report["threshold_failures"]]
    return "\n".join(lines) + "\n"


def _decoding_section(decoding: dict[str, Any]) -> list[str]:
    """Per cached graph: greedy agreement with its PyTorch reference, cached vs full-sequence perplexity, and
    prefill / next-token latency (speed-up of decoding over the FP32 graph at each batch size)."""
    models = decoding["models"]
    batches = [lat["batch"] for lat in next(iter(models.values()))["latency"]] if models else []
    fp32 = models.get("fp32-onnx")
    lines = [
        "",
        f"## Decoding (KV cache): greedy tokens, cache consistency, latency at a past of {decoding['past']} tokens",
        "",
        f"Greedy: {decoding['prompts']} fixed prompts x {decoding['new_tokens']} new tokens, exact matches with the "
        "reference's tokens (first divergence of the others). Cache: perplexity of the same windows with the second "
        "half decoded token by token on the cache vs one full-sequence call (a graph that quantizes activations "
        "dynamically, per tensor of each call, computes different numbers for one call of 256 tokens and 256 calls "
        "of one: that is its definition, not a fault of the cache).",
        "",
    ]
    header = ["model", "reference", "greedy exact", "first divergences", "ppl full", "ppl cached", "rel. diff"]
    for b in batches:
        header += [f"prefill ms b{b}", f"decode ms b{b}", f"tokens/s b{b}", f"decode speed-up b{b}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in models.items():
        greedy, cache = row["greedy"], row["cache"]
        parted = sorted(d for d in greedy["first_divergence"] if d is not None)
        cells = [name, row["reference"], f"{greedy['exact']}/{greedy['prompts']}", ", ".join(map(str, parted)) or "—"]
        cells += [_fmt(cache["full"], 3), _fmt(cache["cached"], 3), f"{cache['relative_difference']:.1e}"]
        for i, lat in enumerate(row["latency"]):
            base = fp32["latency"][i]["decode_ms"] if fp32 else None
            cells += [_fmt(lat["prefill_ms"]), _fmt(lat["decode_ms"]), _fmt(lat["tokens_per_second"], 1)]
            cells.append(_fmt(base / lat["decode_ms"]) + "x" if base else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
    held_out = history.get("held_out") or []
    if held_out:  # selection checks are per round: placed at the round's last student step
        per_round = len(history.get("student_discrepancy") or []) / max(held_out[-1][0], 1)
        ax.plot([r * per_round for r, _ in held_out], [v for _, v in held_out], "o-", markersize=3,
                label="held-out samples (selection)")  # fmt: skip
        best = next((v for r, v in held_out if r == history.get("selected_round")), None)
        if best is not None:
            ax.plot([history["selected_round"] * per_round], [best], "k*", markersize=10, label="selected")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def render_serve_markdown(report: dict[str, Any]) -> str:
    """The serving check: where and how it was served, the load levels, the malformed requests."""
    effect, windows = report["batching_effect"], report["windows"]
    lines = [
        f"# Serving check: {report['model']}",
        "",
        f"- Graph: `{report['graph']}`; {report['server']}, measured with perf_analyzer ({report['perf_analyzer']})",
        f"- Machine: {report['machine']}; perf_analyzer runs on the same CPUs as the server",
        f"- Endpoints: HTTP {report['endpoints']['http']}, gRPC {report['endpoints']['grpc']}, "
        f"metrics {report['endpoints']['metrics']}",
        *_serve_models(report),
        f"- Answers (HTTP and gRPC, alone and batched) vs the model in-process: max abs diff "
        f"{report['answers']['http_max_abs_diff']:.2e} / {report['answers']['grpc_max_abs_diff']:.2e}",
        f"- Result: {'passed' if report['passed'] else 'FAILED'}",
        "",
        f"## Load ({report.get('request', 'one text')} per request; perf_analyzer time windows of "
        f"{windows['window_ms']} ms, three in a row "
        f"within {windows['stability_percent']:g}%)",
        "",
        "| protocol | model | instances | concurrency | infer/s | p50 ms | p99 ms | queue ms | compute ms | failed "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in report["levels"]:
        cells = [lv["protocol"], lv["model"], lv["instances"], lv["concurrency"], _ms(lv["throughput"])]
        cells += [_ms(lv[k]) for k in ("p50_ms", "p99_ms", "queue_ms", "compute_ms")] + [lv["server_failures"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + f" | {lv['error'] or ''} |")
    if effect:
        lines += [
            "",
            f"Dynamic batching at concurrency {effect['concurrency']} (HTTP): {effect['throughput_ratio']}x the "
            f"unbatched throughput, p99 {effect['p99_batched_ms']} ms vs {effect['p99_unbatched_ms']} ms.",
        ]
    lines += _instances_section(report.get("instances_effect"))
    malformed = report["malformed"]
    lines += [
        "",
        "## Malformed requests",
        "",
        "| protocol | request | status | reason | clean |",
        "|---|---|---|---|---|",
    ]
    for case in malformed["cases"]:
        clean = case["one_line"] and case["no_traceback"] and case["no_path"]
        reason = case["reason"].replace("|", "\\|")
        lines.append(f"| {case['protocol']} | {case['request']} | {case['status']} | {reason} | {clean} |")
    counters = ", ".join(f"{name} {value}" for name, value in malformed["counters"].items())
    lines += ["", f"Served after them: {malformed['served_after']}. Failure counters: {counters}."]
    return "\n".join(lines) + "\n"


def _serve_models(report: dict[str, Any]) -> list[str]:
    """One line per model of the repository."""
    said = {"served": "served", "unbatched": "the same without the batcher", "instances": "the other instance count"}
    lines = [f"- `{v['name']}` ({said[v['role']]}): {v['described']}" for v in report["variants"]]
    lines.append(f"- Max batch {report['max_batch_size']} texts per request")
    return lines


def _instances_section(effect: dict[str, Any] | None) -> list[str]:
    """Throughput and p99 per instance count at each concurrency (HTTP, both with the served batcher)."""
    if not effect:
        return []
    fewer, more = (str(n) for n in effect["instances"])
    lines = [
        "",
        f"## Instances: {fewer} vs {more} (HTTP, same batcher, interleaved at each concurrency)",
        "",
        f"| concurrency | {fewer} inst. infer/s | {fewer} inst. p99 ms | {more} inst. infer/s | {more} inst. p99 ms "
        f"| throughput {more}/{fewer} |",
        "|---|---|---|---|---|---|",
    ]
    for row in effect["levels"]:
        tput, p99 = row["throughput"], row["p99_ms"]
        cells = [row["concurrency"], _ms(tput[fewer]), _ms(p99[fewer]), _ms(tput[more]), _ms(p99[more])]
        lines.append("| " + " | ".join(str(c) for c in cells) + f" | {row['throughput_ratio']}x |")
    return lines


def plot_serve_load(report: dict[str, Any], path: Path) -> None:
    """Throughput and p99 latency against concurrency, one line per model (batching, instance count) and
    protocol."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[dict[str, Any]]] = {}
    for lv in report["levels"]:
        if lv["completed"]:
            label = f"{lv['model']} ({lv['protocol']}, {lv['instances']} inst.)"
            series.setdefault(label, []).append(lv)
    for label, levels in series.items():
        x = [lv["concurrency"] for lv in levels]
        left.plot(x, [lv["throughput"] for lv in levels], marker="o", label=label)
        right.plot(x, [lv["p99_ms"] for lv in levels], marker="o", label=label)
    for ax, ylabel in ((left, "inferences / s"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (one-text requests)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"{report['model']} served by Triton on {report['machine']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_serve_report(report: dict[str, Any], run_dir: Path) -> None:
    """``serve/load.json``, ``serve/report.md`` and ``serve/load.png`` in the run folder."""
    atomic_write_text(run_dir / SERVE_LOAD, json.dumps(report, indent=2) + "\n")
    atomic_write_text(run_dir / SERVE_REPORT, render_serve_markdown(report))
    plot_serve_load(report, run_dir / SERVE_PLOT)
