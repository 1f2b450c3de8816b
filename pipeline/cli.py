"""The ``zsaq-pipeline`` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from calib.errors import ConfigError, PipelineError, ThresholdFailed
from pipeline import __version__
from pipeline.layout import REPORT_MD, SERVE_DIR, SERVE_REPORT, STUDENT_ONNX

EXPORT_CHOICES = ("onnx", "trt", "triton")


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`PipelineError` into one line on stderr and its exit code, never a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PipelineError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; continue later with --resume", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zsaq-pipeline")
def main() -> None:
    """Data-free quantization of fine-tuned language models into int8/int4 ONNX and TensorRT engines.

    \b
    zsaq-pipeline run configs/minilm.yaml --out runs/minilm     # teacher -> ... -> validate
    zsaq-pipeline inspect runs/minilm                           # stages, timings, metrics
    """


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--export",
    "exports",
    multiple=True,
    type=click.Choice(EXPORT_CHOICES),
    help="Add an export target (repeatable): onnx (always made), trt (TensorRT engine), triton (model repository).",
)
@click.option(
    "--out", "out", type=click.Path(file_okay=False, path_type=Path), help="Run folder (default: runs/<config name>)."
)
@click.option("--resume", is_flag=True, help="Continue a run: stages whose artifacts verify are skipped.")
@click.option("--force", is_flag=True, help="Replace an existing run folder.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option(
    "--nproc",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Data-parallel processes for calibrate and quantize on this machine (gloo on CPU, NCCL on GPUs), each "
    "with cores/N threads; rank 0 writes the run. Under torchrun, leave it out.",
)
@user_errors
def run(
    config_path: Path,
    exports: tuple[str, ...],
    out: Path | None,
    resume: bool,
    force: bool,
    quiet: bool,
    nproc: int,
) -> None:
    """Run the pipeline described by CONFIG (a YAML file) into a run folder."""
    from pipeline.config import load_config, settle_generator, weight_range_notice, with_export_formats

    config = with_export_formats(load_config(config_path), exports, str(config_path))  # no torch imported yet
    config, generator_notice = settle_generator(config)
    notices = [n for n in (generator_notice, weight_range_notice(config)) if n is not None]
    from pipeline import launch

    rank, world, _ = launch.environment_ranks()
    if nproc > 1 and world > 1:
        raise ConfigError(f"--nproc: this process is already rank of {world} (torchrun?): leave --nproc out")
    launch.check_parallel_config(config, max(nproc, world))
    if nproc > 1:
        sys.exit(launch.launch(launch.without_nproc(sys.argv[1:]), nproc))
    from transformers.utils import logging as hf_logging

    from pipeline.model_checks import check_against_model
    from pipeline.runner import follow_stages, run_pipeline

    hf_logging.disable_progress_bar()  # our own stage lines and bars are the progress; not every weight load
    hf_logging.set_verbosity_error()
    check_against_model(config, str(config_path))
    for notice in notices if rank == 0 else []:
        click.echo(f"notice: {notice}", err=True)  # after every input check: a bad input stays one line
    out = out or Path("runs") / config_path.stem
    parallel = launch.join_process_group(config)
    if not parallel.is_main:
        follow_stages(config, parallel)
        launch.leave_process_group()
        return
    run_pipeline(config, out, resume=resume, force=force, show_progress=not quiet, parallel=parallel)
    launch.leave_process_group()
    if not quiet:
        click.echo(f"done: {out}/manifest.json")
        report = REPORT_MD.path(out)
        if report.is_file():
            click.echo(report.read_text(encoding="utf-8"))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def inspect(run_dir: Path, as_json: bool) -> None:
    """Show a run folder's stages, timings, artifacts and headline metrics."""
    from pipeline.run_summary import summarize

    summary = summarize(run_dir)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"run: {run_dir}  (config sha256 {summary['config_sha256'][:12]}, zsaq-pipeline {summary['version']})")
    for stage in summary["stages"]:
        seconds = f"{stage['seconds']:.1f}s" if stage.get("seconds") is not None else ""
        note = stage.get("reason") or stage.get("error") or ""
        click.echo(
            f"  {stage['name']:<10} {stage['status']:<12} {seconds:>8}  {len(stage['artifacts'])} artifacts  {note}"
        )
        for path in stage["artifacts"]:
            click.echo(f"      {path}")
    for name, value in summary["headline"].items():
        click.echo(f"  {name}: {value}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", default=64, show_default=True, help="New tokens at most (fewer at end of text).")
@click.option("--model", default=Path(STUDENT_ONNX["cpu"].name).stem, show_default=True, help="Exported graph (stem).")
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy; above 0: sampling.")
@click.option("--top-k", default=0, show_default=True, help="Sample from the k most likely tokens (0: all).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (instruct models).")
@click.option("--threads", default=0, show_default=True, help="ONNX Runtime threads (0: all cores).")
@user_errors
def generate(
    run_dir: Path,
    prompt: str,
    max_new_tokens: int,
    model: str,
    temperature: float,
    top_k: int,
    seed: int,
    chat: bool,
    threads: int,
) -> None:
    """Generate text from PROMPT with a causal-LM run's exported graph (ONNX Runtime, KV cache), streaming."""
    from exporters.decoding import Sampling
    from pipeline.generation import stream_text

    if temperature < 0 or top_k < 0:
        raise ConfigError(f"--temperature and --top-k: expected 0 or more, got {temperature} and {top_k}")
    stats = stream_text(
        run_dir, prompt, model, max_new_tokens, Sampling(temperature, top_k, seed), threads, chat,
        lambda text: click.echo(text, nl=False),
    )  # fmt: skip
    click.echo("")
    click.echo(
        f"[{model}] prompt {stats.prompt_tokens} tokens in {1000 * stats.prefill_seconds:.0f} ms; "
        f"{stats.new_tokens} new tokens, {stats.tokens_per_second:.1f} tokens/s",
        err=True,
    )


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--port", default=8000, show_default=True, help="HTTP port on 127.0.0.1.")
@click.option("--grpc-port", default=8001, show_default=True, help="gRPC port on 127.0.0.1.")
@click.option("--metrics-port", default=8002, show_default=True, help="Prometheus metrics port on 127.0.0.1.")
@click.option(
    "--instances",
    type=int,
    help="Model instances (Triton's instance_group count; default: the run config's serve.instances, else 1).",
)
@click.option(
    "--threads",
    default=0,
    help="ONNX Runtime threads per instance (default: cores // instances, at least 1, so that the instances "
    "share the cores instead of oversubscribing them; one instance: all cores).",
)
@click.option(
    "--batching/--no-batching",
    default=True,
    show_default=True,
    help="Triton's dynamic batcher: the run config's serve.dynamic_batching, else set from the validate stage's "
    "measured batch latencies.",
)
@click.option(
    "--load-check",
    is_flag=True,
    help="Measure with perf_analyzer (HTTP and gRPC, with and without the batcher, with 1 and 2 instances), send "
    "malformed requests, write RUN/serve/report.md, load.json and load.png, then stop.",
)
@click.option("--concurrency", default="1,4,16", show_default=True, help="Load check: concurrency levels.")
@click.option("--window-ms", default=2000, show_default=True, help="Load check: perf_analyzer's measurement window.")
@click.option(
    "--stability", default=30.0, show_default=True, help="Load check: % within which three windows in a row agree."
)
@user_errors
def serve(
    run_dir: Path,
    port: int,
    grpc_port: int,
    metrics_port: int,
    instances: int | None,
    threads: int,
    batching: bool,
    load_check: bool,
    concurrency: str,
    window_ms: int,
    stability: float,
) -> None:
    """Serve a run's CPU student (raw text in; a causal LM generates) through a Triton server on 127.0.0.1 (needs
    the serve extra)."""
    levels = _concurrency_levels(concurrency)
    if window_ms < 100 or not 0 < stability <= 100:
        raise ConfigError(
            f"--window-ms: expected at least 100 and --stability in (0, 100], got {window_ms}, {stability}"
        )
    from exporters.triton_server import Ports, require_server
    from pipeline.serving import served_spec

    if instances is not None and instances < 1:
        raise ConfigError(f"--instances: expected 1 or more, got {instances}")
    if threads < 0:
        raise ConfigError(f"--threads: expected 0 (cores // instances) or more, got {threads}")
    require_server()
    spec = served_spec(run_dir, threads, batching, instances)
    if load_check:
        from exporters.perf_analyzer import Windows, perf_analyzer

        perf_analyzer()  # a missing library is a one-line error before the server starts
    import tempfile

    from exporters.triton_serve import Serving, write_serve_repository

    try:
        with tempfile.TemporaryDirectory(prefix="zsaq-serve-") as repository:
            variants = write_serve_repository(Path(repository), spec, with_twins=load_check)
            ports = Ports(port, grpc_port, metrics_port)
            models = [v.name for v in variants]
            with Serving(Path(repository), models, ports, run_dir / SERVE_DIR) as server:
                if load_check:
                    windows = Windows(window_ms, stability)
                    _run_load_check(run_dir, spec, variants, server.endpoints, levels, windows)
                    return
                _print_endpoints(spec, variants[0], server)
                server.wait()
    except KeyboardInterrupt:  # before the server was up, or during the load check: it is stopped
        click.echo("error: interrupted; the server is stopped", err=True)
        sys.exit(130)
    click.echo("stopped")


def _concurrency_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency: expected positive integers separated by commas, got {text!r}")
    return levels


def _print_endpoints(spec: Any, served: Any, server: Any) -> None:
    endpoints = server.endpoints
    click.echo(f"serving {served.name} (raw text in) from {spec.graph}")
    click.echo(f"  HTTP     {endpoints.http}  (Triton's HTTP/REST protocol)")
    click.echo(f"  gRPC     {endpoints.grpc}")
    click.echo(f"  metrics  {endpoints.metrics}")
    click.echo(f"  {served.describe()}")
    click.echo(f"  {spec.describe_requests()}")
    click.echo(f"  logs: {server.triton_log}, {server.front_log}; Ctrl-C stops")


def _run_load_check(
    run_dir: Path, spec: Any, variants: list, endpoints: Any, levels: tuple[int, ...], windows: Any
) -> None:
    from dataclasses import asdict

    from tqdm import tqdm

    from exporters.cpu_kernels import machine_description
    from exporters.serve_check import load_check
    from pipeline.report import render_serve_markdown, write_serve_report

    served = variants[0]
    steps = 2 + (len(variants) + 1) * len(levels)  # answers, each model over HTTP and the served one over gRPC
    with tqdm(total=steps, desc="load check", unit="step", file=sys.stderr) as bar:

        def progress(step: str) -> None:  # a step starts: the one before it is done
            bar.update(1 if bar.postfix else 0)
            bar.set_postfix_str(step)

        reference = spec.reference_model()
        found = load_check(endpoints, reference, spec.max_batch_size, variants, levels, windows, progress)
        bar.update(1)
    report = {
        "model": served.name,
        "unbatched_model": next(v.name for v in variants if v.role == "unbatched"),
        "graph": str(spec.graph),
        "machine": machine_description(),
        "threads": served.threads,
        "instances": served.instances,
        "batching": served.batching.describe() if served.batching else "no dynamic batching",
        "max_batch_size": spec.max_batch_size,
        "variants": [
            {**asdict(v), "batching": v.batching.describe() if v.batching else None, "described": v.describe()}
            for v in variants
        ],
        **found,
    }
    write_serve_report(report, run_dir)
    click.echo(render_serve_markdown(report))
    if not report["passed"]:
        raise ThresholdFailed(f"serve: the load check failed; see {run_dir / SERVE_REPORT}")


@main.command()
@click.option(
    "--check",
    "check_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Compare int8/FP32 and int4/FP32 speed-ups with this baseline file; exit 4 on a regression.",
)
@click.option(
    "--record",
    "record_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Store this machine's speed-ups (medians of 3 measurements) in this baseline file (other machines' "
    "entries are kept).",
)
@click.option(
    "--table",
    "table_spec",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Make the comparison table this spec describes (Markdown, CSV, PNG in --out; resumes from its cells).",
)
@click.option("--out", "table_out", type=click.Path(file_okay=False, path_type=Path), help="Folder for --table.")
@click.option("--rows", "rows", multiple=True, help="With --table: run only these rows (repeatable; row keys).")
@click.option("--tasks", "tasks", multiple=True, help="With --table: run only these tasks (repeatable).")
@click.option("--seeds", "seeds", multiple=True, type=int, help="With --table: run only these seeds (repeatable).")
@click.option(
    "--readme",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --table: also put the table in this file's bench-table block.",
)
@click.option("--render-only", is_flag=True, help="With --table: render from the cells present, run nothing.")
@click.option(
    "--list-cells",
    is_flag=True,
    help="With --table: print the id of each cell the spec plans (after --rows / --tasks / --seeds), one a line; "
    "run nothing (--out not needed).",
)
@click.option(
    "--cell",
    "cell_ids",
    multiple=True,
    metavar="ID",
    help="With --table and --out: run only this cell (an id from --list-cells; repeatable) unless its file exists, "
    "and write only its file, so any number of workers (xargs -P, a Slurm array, Jobs) can share one --out; then "
    "make the table once with --render-only. The 'latency' cell times CPU formats: give it a machine to itself.",
)
@click.option(
    "--missing-ok",
    is_flag=True,
    help="With --check: on a machine kind without a baseline entry, measure, print and exit 0 (CI on new hardware).",
)
@click.option(
    "--threads",
    default=1,  # pipeline.latency_check.DEFAULT_THREADS (not imported here: the module loads ONNX Runtime)
    show_default=True,
    help="ONNX Runtime threads (part of the baseline key).",
)
@click.option("--repeats", default=40, show_default=True, help="Timed calls per model and shape.")
@user_errors
def bench(
    check_path: Path | None,
    record_path: Path | None,
    table_spec: Path | None,
    table_out: Path | None,
    rows: tuple[str, ...],
    tasks: tuple[str, ...],
    seeds: tuple[int, ...],
    readme: Path | None,
    render_only: bool,
    list_cells: bool,
    cell_ids: tuple[str, ...],
    missing_ok: bool,
    threads: int,
    repeats: int,
) -> None:
    """Latency regression check on a small fixed model (--check / --record), or the comparison table (--table)."""
    if sum(p is not None for p in (check_path, record_path, table_spec)) != 1:
        raise ConfigError("bench: give exactly one of --check BASELINE.json, --record BASELINE.json, --table SPEC.yaml")
    if table_spec is not None:
        _bench_table(table_spec, table_out, rows, tasks, seeds, readme, render_only, list_cells, cell_ids)
        return
    if list_cells or cell_ids:
        raise ConfigError("bench: --list-cells and --cell go with --table SPEC.yaml")
    from pipeline import latency_check

    if repeats < 4:
        raise ConfigError(f"bench: --repeats must be at least 4 (one per measuring block), got {repeats}")
    path = check_path or record_path
    baseline = latency_check.read_baseline(path)
    key = latency_check.machine_key(threads)
    if check_path is not None and key not in baseline["entries"] and missing_ok:
        # a new machine kind is not a regression: show its figures so someone can record them
        click.echo(latency_check.render(latency_check.measure(threads, repeats), baseline))
        click.echo(f"no baseline for '{key}': not compared; record with: zsaq-pipeline bench --record {check_path}")
        return
    if check_path is not None:  # fail before measuring when there is nothing to compare with
        latency_check.baseline_entry(baseline, key, str(check_path))
    if record_path is not None:
        runs = [latency_check.measure(threads, repeats) for _ in range(latency_check.RECORD_RUNS)]
        measured = latency_check.median_measurement(runs)
        latency_check.record(measured, baseline, record_path)
        click.echo(latency_check.render(measured, baseline))
        click.echo(f"recorded: {record_path}")
        return
    measured = latency_check.measure(threads, repeats)
    failures = latency_check.compare(measured, baseline, str(check_path))
    click.echo(latency_check.render(measured, baseline))
    if failures:
        # a shared machine's slow phase lowers one measurement's ratios (b1 int8 1.6x-2.4x seen here); a real
        # regression lowers every measurement: fail only when a second measurement fails too
        click.echo("below the baseline: measuring once more")
        measured = latency_check.measure(threads, repeats)
        failures = latency_check.compare(measured, baseline, str(check_path))
        click.echo(latency_check.render(measured, baseline))
    if failures:
        raise ThresholdFailed("latency regression: " + "; ".join(failures))
    click.echo("latency check passed")


def _bench_table(
    spec_path: Path,
    out: Path | None,
    rows: tuple[str, ...],
    tasks: tuple[str, ...],
    seeds: tuple[int, ...],
    readme: Path | None,
    render_only: bool,
    list_cells: bool = False,
    cell_ids: tuple[str, ...] = (),
) -> None:
    from pipeline import benchmark, benchmark_report

    if list_cells and cell_ids:
        raise ConfigError("bench --table: give --list-cells or --cell ID, not both")
    if (list_cells or cell_ids) and (render_only or readme is not None):
        raise ConfigError("bench --table: --list-cells / --cell render nothing; make the table with --render-only")
    if out is None and not list_cells:
        raise ConfigError("bench --table: give --out FOLDER for the table and its cells")
    spec = benchmark.load_spec(spec_path)
    if readme is not None:
        benchmark_report.check_readme(readme, spec.path)  # before hours of cells, not after
    cells = [c for c in benchmark.planned_cells(spec, rows, tasks) if not seeds or c.seed in seeds]
    latency = not rows or "fp32" in rows
    if list_cells:
        for cell_id in benchmark.cell_ids(spec, cells, latency):
            click.echo(cell_id)
        return
    if cell_ids:
        filters = [
            f"--{name} {v}" for name, values in (("rows", rows), ("tasks", tasks), ("seeds", seeds)) for v in values
        ]
        listing = " ".join([f"zsaq-pipeline bench --table {spec_path} --list-cells", *filters])
        _bench_cells(spec, out, cells, latency, cell_ids, listing)
        return
    failures = [] if render_only else benchmark.run_missing(spec, out, cells, latency)
    # the command that makes the whole table (runs with --rows / --tasks fill parts of the same cells)
    command = f"zsaq-pipeline bench --table {spec_path} --out {out}" + (f" --readme {readme}" if readme else "")
    table = benchmark_report.write_reports(spec, out, command, readme)
    click.echo(table.read_text(encoding="utf-8"))
    if failures:
        raise PipelineError(f"bench: {len(failures)} cell(s) failed, first: {failures[0]}")


def _bench_cells(spec: Any, out: Path, cells: list[Any], latency: bool, ids: tuple[str, ...], listing: str) -> None:
    """``bench --cell``: run the named cells whose files are missing and write only their files (no table:
    workers sharing ``out`` would race to render it); one line per cell on stderr, nothing on stdout."""
    from pipeline import benchmark

    chosen, timed = benchmark.select_cells(spec, cells, latency, ids, listing)
    paths = {cell.id: cell.path(out) for cell in chosen}
    if timed:
        paths[benchmark.LATENCY_ID] = out / benchmark.CELLS_DIR / benchmark.LATENCY_CELL
    present = [cell_id for cell_id, path in paths.items() if path.is_file()]
    for cell_id in present:
        click.echo(f"{cell_id}: skipped, {paths[cell_id]} exists (delete it to run the cell again)", err=True)
    failures = benchmark.run_missing(spec, out, chosen, timed, progress=False)
    for cell_id, path in paths.items():
        if cell_id not in present and path.is_file():
            click.echo(f"{cell_id}: wrote {path}", err=True)
    if failures:
        raise PipelineError(f"bench: {len(failures)} cell(s) failed, first: {failures[0]}")


if __name__ == "__main__":
    main()
