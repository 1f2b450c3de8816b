"""One cell of the comparison table (a row on a task with a seed), or the latency / size measurement.

Each cell runs in its own process (``python -m pipeline.benchmark_cell``) so its peak memory is its own
and a crash loses one cell; the table is rendered from the cell files, so a stopped benchmark resumes.
Minutes count what the method costs (calibration and quantization, or export for ONNX Runtime's
dynamic quantization), not the evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import onnx
import torch
from onnxruntime.quantization import quantize_dynamic

from calib.gptq import apply_gptq
from calib.inputs import random_tokens
from calib.learn import learn_quantizers
from calib.models import TaskModel, load_backbone, load_source_tokenizer
from calib.student import build_student, init_ranges
from calib.zsaq import calibrate_zsaq
from exporters.cpu_kernels import machine_description
from exporters.onnx_export import export_onnx, teacher_export_model
from exporters.runners import OrtRunner, measure_latencies
from exporters.validation import EvalInputs, build_eval_inputs, evaluate_torch, task_metric
from pipeline.benchmark_rows import RTN_GROUP, Row, row_by_key, row_config
from pipeline.config import ActivationQuant, PipelineConfig, QuantConfig, WeightQuant, load_config
from pipeline.runfolder import atomic_write_text
from pipeline.stages.calibrate import baseline_inputs, special_token_ids
from pipeline.stages.export import int4_weight_only_graph, int4_weight_only_quant, round_to_nearest_graph

LATENCY_SCHEMES = {
    "w8a8": (8, 8),
    "w4a8": (4, 8),
    "w8a16": (8, 16),
}


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_frozen_teacher(config: PipelineConfig) -> TaskModel:
    """The task's FP teacher, frozen."""
    teacher = TaskModel(load_backbone(config.model, config.task), config.task.kind).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def quantized_student(row: Row, config: PipelineConfig, teacher: TaskModel, tokenizer: Any) -> TaskModel:  # noqa: ANN401
    """The student the row's method produces, with the task config's quantizer and step budget."""
    calib = config.calib
    torch.manual_seed(calib.seed)
    if row.method == "zsaq":
        specials, _ = special_token_ids(tokenizer)
        game, _ = calibrate_zsaq(config, teacher, specials, show_progress=True, tokenizer=tokenizer)
        return game.student
    if row.method == "rtn" and row.weight_bits == 4:  # exactly the W4A16 model the export stage ships
        quant = int4_weight_only_quant(teacher, RTN_GROUP)
        student = build_student(teacher, quant)
        init_ranges(student, quant, [])
        return student
    student = build_student(teacher, config.quant)
    if row.method == "rtn":
        init_ranges(student, config.quant, [])  # weights only: no activation ranges to set
        return student
    batches = baseline_inputs(config, teacher, tokenizer).batches(calib.generator.batch_size)
    init_ranges(student, config.quant, batches)
    if row.method == "gptq":
        apply_gptq(student, batches)
    elif row.method == "qat":
        steps = calib.sam_sga.rounds * calib.sam_sga.student_steps  # ZSAQ's student-step budget
        learn = dataclasses.replace(config.quant.learn, steps=steps)
        learn_quantizers(teacher, student, batches, learn, show_progress=True)
    return student


def _onnx_metric(path: Path, inputs: EvalInputs) -> float | None:
    runner = OrtRunner("model", path, os.cpu_count() or 1)
    return task_metric(inputs, [runner(i, m) for i, m in inputs.batches_a], [runner(i, m) for i, m in inputs.batches_b])


def run_cell(base: PipelineConfig, row: Row, seed: int, real_data: str | None) -> dict[str, Any]:
    """Metric, minutes and peak memory of one row on one task with one seed."""
    teacher = load_frozen_teacher(base)
    tokenizer = load_source_tokenizer(base.model)
    inputs, fallback = build_eval_inputs(base, tokenizer, teacher.backbone.config.vocab_size)
    if fallback:
        raise click.ClickException(f"the benchmark needs task data: {fallback}")
    started = time.perf_counter()
    if row.method == "fp32":
        metric = evaluate_torch(teacher, base, inputs)[0]
        minutes = 0.0
    elif row.method == "ort-dynamic":
        with tempfile.TemporaryDirectory(prefix="zsaq-bench-") as tmp:
            fp32, dynamic = Path(tmp) / "fp32.onnx", Path(tmp) / "dynamic.onnx"
            export_onnx(teacher_export_model(teacher), fp32, base.export.opset)
            quantize_dynamic(fp32, dynamic, per_channel=True)
            minutes = (time.perf_counter() - started) / 60
            metric = _onnx_metric(dynamic, inputs)
    else:
        student = quantized_student(row, row_config(base, row, seed, real_data), teacher, tokenizer)
        minutes = (time.perf_counter() - started) / 60
        metric = evaluate_torch(student, base, inputs)[0]
    return {
        "metric": metric,
        "minutes": round(minutes, 3),
        "peak_gib": round(_peak_gib(), 3),
        "seed": seed,
        "machine": machine_description(),
    }


def measure_formats(base: PipelineConfig, repeats: int) -> dict[str, Any]:
    """Speed-up over FP32 (median latency, side by side in one run) and file size of each CPU format."""
    teacher = load_frozen_teacher(base)
    vocab = teacher.backbone.config.vocab_size
    seq_len = max(s for _, s in base.validate.shapes)
    batches = random_tokens(16, seq_len, vocab, seed=0).batches(8)  # latency does not depend on range values
    opset = base.export.opset
    with tempfile.TemporaryDirectory(prefix="zsaq-bench-") as tmp:
        paths = {"fp32": Path(tmp) / "fp32.onnx"}
        export_onnx(teacher_export_model(teacher), paths["fp32"], opset)
        paths["ort-dynamic"] = Path(tmp) / "ort-dynamic.onnx"
        quantize_dynamic(paths["fp32"], paths["ort-dynamic"], per_channel=True)
        for name, (w_bits, a_bits) in LATENCY_SCHEMES.items():
            quant = QuantConfig(
                weights=WeightQuant(bits=w_bits), activations=ActivationQuant(bits=a_bits, init="minmax")
            )
            paths[name] = Path(tmp) / f"{name}.onnx"
            onnx.save(round_to_nearest_graph(teacher, quant, batches, "cpu", opset), str(paths[name]))
        paths["w4a16"] = Path(tmp) / "w4a16.onnx"
        onnx.save(int4_weight_only_graph(teacher, 32, opset), str(paths["w4a16"]))
        threads = base.validate.threads or os.cpu_count() or 1
        runners = [OrtRunner(name, path, threads) for name, path in paths.items()]
        shapes = base.validate.shapes
        latencies = measure_latencies(runners, shapes, warmup=2, repeats=repeats, vocab_size=vocab)
        sizes = {name: path.stat().st_size / 2**20 for name, path in paths.items()}
    p50 = {name: {f"b{x.batch}x{x.seq_len}": x.p50_ms for x in lats} for name, lats in latencies.items()}
    return {
        "shapes": [f"b{b}x{s}" for b, s in shapes],
        "p50_ms": p50,
        "speedup": {name: {s: p50["fp32"][s] / ms for s, ms in shapes_ms.items()} for name, shapes_ms in p50.items()},
        "size_mb": sizes,
        "threads": threads,
        "machine": machine_description(),
    }


@click.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--row", "row_key", help="Row key (see pipeline.benchmark_rows); omit with --latency.")
@click.option("--seed", type=int, default=0)
@click.option("--real-data", "real_data", default=None, help="Task training file for the real-data rows.")
@click.option("--latency", "latency_repeats", type=int, default=None, help="Measure the CPU formats instead.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def main(
    config_path: Path, row_key: str | None, seed: int, real_data: str | None, latency_repeats: int | None, out: Path
) -> None:
    """Run one cell and write its JSON (through a temporary name: a killed cell leaves no file)."""
    base = load_config(config_path)
    if latency_repeats is not None:
        result = measure_formats(base, latency_repeats)
    else:
        result = run_cell(base, row_by_key(row_key), seed, real_data)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
