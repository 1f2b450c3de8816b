"""One cell of a comparison table (a row on a task with a seed), or the latency / size measurement, in its
own process. A row's procedure (:data:`PROCEDURES`) makes its model with the calls the pipeline's stages
make (:func:`calib.methods.calibrate`, :func:`calib.methods.quantize_student`)."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx
import torch

from calib.inputs import random_tokens
from calib.methods import CalibrationRequest, calibrate, int4_weight_only_quant, quantize_student
from calib.models import TaskModel, frozen_teacher, load_backbone, load_source_tokenizer
from calib.sam_sga import GameHistory
from calib.zsaq import game_student_state
from exporters.cpu_kernels import machine_description
from exporters.graphs import FORMAT_SCHEMES, WEIGHT_ONLY_GROUP, cpu_format_graphs, ort_dynamic_graph, student_graph
from exporters.metrics import fidelity
from exporters.onnx_export import export_onnx, teacher_export_model
from exporters.onnx_qdq import ExportUnsupported
from exporters.peer_graphs import (
    Feeds,
    Int4Method,
    PeerUnavailable,
    StaticMethod,
    modelopt_graph,
    ort_int4_graph,
    ort_static_graph,
    peer_format_graphs,
    sample_feeds,
)
from exporters.runners import speedups
from exporters.validation import EvalInputs, build_eval_inputs, evaluate_onnx, evaluate_torch
from pipeline.benchmark import BenchSpec, BenchTask, load_spec, task_config
from pipeline.benchmark_rows import Row, row_patch
from pipeline.config import PipelineConfig, load_config
from pipeline.runfolder import atomic_write_text

Evaluation = tuple[float | None, np.ndarray]  # the task metric and the flattened outputs (for fidelity)
Procedure = Callable[[PipelineConfig, TaskModel, Any, EvalInputs], Evaluation]
LearningRecord = dict[str, Any]  # where a student's making spent its time, and what a game ended on
StudentProcedure = Callable[[PipelineConfig, TaskModel, Any], tuple[TaskModel, LearningRecord]]


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _learned(steps: int | None) -> Callable[[PipelineConfig], PipelineConfig]:
    """A config change: ``quant.learn.steps`` (None: ZSAQ's student-step budget, rounds x student steps)."""

    def change(config: PipelineConfig) -> PipelineConfig:
        sga = config.calib.sam_sga
        budget = sga.rounds * sga.student_steps if steps is None else steps
        learn = dataclasses.replace(config.quant.learn, steps=budget)
        return dataclasses.replace(config, quant=dataclasses.replace(config.quant, learn=learn))

    return change


def _calibrated(change: Callable[[PipelineConfig], PipelineConfig]) -> StudentProcedure:
    """The pipeline's calibrate + quantize in-process on the changed config. Learning steps on batches of the
    generator's size, as ZSAQ's student does, so every learning row takes the same steps on the same batch size."""

    def student(config: PipelineConfig, teacher: TaskModel, tokenizer: Any) -> tuple[TaskModel, LearningRecord]:
        config = change(config)
        calib = config.calib
        torch.manual_seed(calib.seed)
        started = time.perf_counter()
        calibration = calibrate(CalibrationRequest(teacher, tokenizer, calib, config.quant, config.task))
        calibrated = time.perf_counter()
        game = calibration.game
        state = None if game is None else game_student_state(game.student, calib, config.quant.learn)
        batches = calibration.samples.batches(calib.generator.batch_size)
        model = quantize_student(teacher, config.quant, batches, state)[0]
        record = {
            "calibrate_minutes": (calibrated - started) / 60,
            "quantize_minutes": (time.perf_counter() - calibrated) / 60,
        }
        return model, record if game is None else record | {"game": _game_record(game.history)}

    return student


def _game_record(history: GameHistory) -> LearningRecord:
    """What a cell keeps of a ZSAQ game: the minutes each player's steps took, the held-out checks ([round,
    discrepancy]) and the round whose student the game ended on (-1: the last, no selection). The record's
    minutes are not rounded: its parts can take milliseconds, and they sum to at most the calibration's."""
    return {
        "generator_minutes": history.generator_seconds / 60,
        "student_minutes": history.student_seconds / 60,
        "held_out": history.held_out,
        "selected_round": history.selected_round,
    }


def _round_to_nearest(config: PipelineConfig, teacher: TaskModel, tokenizer: Any) -> tuple[TaskModel, LearningRecord]:
    """Weight-only, no calibration: int4 rows are the W4A16 model the export stage ships (in the row's groups,
    range init and zero points when it sets ``quant.weights``)."""
    w, a = config.quant.weights, config.quant.activations
    quant = _learned(0)(config).quant
    if (w.bits, a.bits) == (4, 16):
        shipped = int4_weight_only_quant(teacher, w.group_size or WEIGHT_ONLY_GROUP)
        weights = dataclasses.replace(shipped.weights, init=w.init, zero_point=w.zero_point)
        quant = dataclasses.replace(shipped, weights=weights)
    return quantize_student(teacher, quant, [], show_progress=False)[0], {}


GraphMaker = Callable[[Path, Path, PipelineConfig, TaskModel, Any], None]  # (fp32, out, config, teacher, tokenizer)


def _calibration_feeds(config: PipelineConfig, teacher: TaskModel, tokenizer: Any) -> list[Feeds]:
    """The row's calibration inputs (``calib.method``: the row's ``inputs``) as one ONNX feed per sample."""
    calibration = calibrate(CalibrationRequest(teacher, tokenizer, config.calib, config.quant, config.task))
    try:
        return sample_feeds(calibration.samples)
    except ValueError as exc:
        raise click.ClickException(f"calib.method {config.calib.method}: {exc}") from None


def _onnx_peer(make: GraphMaker) -> Procedure:
    """A procedure that quantizes the teacher's FP32 ONNX graph with a peer's tool and scores the result on ONNX
    Runtime's CPU provider (a peer that cannot run here fails its cell with the reason, shown in the table)."""

    def run(config: PipelineConfig, teacher: TaskModel, tokenizer: Any, inputs: EvalInputs) -> Evaluation:
        with tempfile.TemporaryDirectory(prefix="zsaq-bench-") as tmp:
            fp32, quantized = Path(tmp) / "fp32.onnx", Path(tmp) / "quantized.onnx"
            export_onnx(teacher_export_model(teacher), fp32, config.export.opset)
            try:
                make(fp32, quantized, config, teacher, tokenizer)
            except PeerUnavailable as exc:
                raise click.ClickException(str(exc)) from None
            return evaluate_onnx(quantized, inputs, os.cpu_count() or 1)

    return run


def _ort_static(method: StaticMethod) -> GraphMaker:
    def make(fp32: Path, out: Path, config: PipelineConfig, teacher: TaskModel, tokenizer: Any) -> None:
        ort_static_graph(fp32, out, _calibration_feeds(config, teacher, tokenizer), method)

    return make


def _ort_int4(method: Int4Method) -> GraphMaker:
    """ONNX Runtime's MatMulNBitsQuantizer at the row's group size (``quant.weights.group_size``)."""

    def make(fp32: Path, out: Path, config: PipelineConfig, teacher: TaskModel, tokenizer: Any) -> None:
        ort_int4_graph(fp32, out, method, config.quant.weights.group_size or WEIGHT_ONLY_GROUP)

    return make


def _modelopt_int8(fp32: Path, out: Path, config: PipelineConfig, teacher: TaskModel, tokenizer: Any) -> None:
    """Without a row ``inputs`` ModelOpt draws its own random sample (unseeded); with them, it calibrates on
    those."""
    feeds = _calibration_feeds(config, teacher, tokenizer) if config.calib.method != "zsaq" else None
    modelopt_graph(fp32, out, "int8", feeds)


# How each learning or rounding row method makes its quantized student (scored in PyTorch, then exported).
STUDENTS: dict[str, StudentProcedure] = {
    "rtn": _round_to_nearest,
    "ptq": _calibrated(_learned(0)),
    "qat": _calibrated(_learned(None)),
    "zsaq": _calibrated(_learned(0)),
}
# The other row methods: the FP32 teacher, and peers' tools on its FP32 ONNX graph.
PROCEDURES: dict[str, Procedure] = {
    "fp32": lambda config, teacher, tokenizer, inputs: evaluate_torch(teacher, inputs),
    "ort-dynamic": _onnx_peer(lambda fp32, out, *_: ort_dynamic_graph(fp32, out)),
    "ort-static-minmax": _onnx_peer(_ort_static("minmax")),
    "ort-static-entropy": _onnx_peer(_ort_static("entropy")),
    "modelopt-int8": _onnx_peer(_modelopt_int8),
    "ort-int4-rtn": _onnx_peer(_ort_int4("rtn")),
    "ort-int4-hqq": _onnx_peer(_ort_int4("hqq")),
}


def _exported_metric(config: PipelineConfig, teacher: TaskModel, model: TaskModel, inputs: EvalInputs) -> dict:
    """The task metric of ``model``'s CPU ONNX (the teacher: its FP32 graph; a student: its CPU flavour), or
    why it has none (``exported_error``)."""
    with tempfile.TemporaryDirectory(prefix="zsaq-bench-") as tmp:
        path = Path(tmp) / "model.onnx"
        if model is teacher:
            export_onnx(teacher_export_model(teacher), path, config.export.opset)
        else:
            try:
                export = config.export
                graph = student_graph(teacher, model.cpu(), "cpu", export.opset, export.int4_accuracy_level,
                                      export.cpu_int8_weights)  # fmt: skip
                onnx.save(graph, str(path))
            except ExportUnsupported as exc:
                return {"exported_metric": None, "exported_error": str(exc)}
        return {"exported_metric": evaluate_onnx(path, inputs, os.cpu_count() or 1)[0]}


def run_cell(spec: BenchSpec, task: BenchTask, row: Row, seed: int) -> dict[str, Any]:
    """Metric (and fidelity to FP, if the spec asks), minutes and peak memory of one row on one task."""
    real_data = str(task.real_data) if row.uses_data else None
    config = task_config(spec, task, row_patch(row, seed, real_data) if row.method != "fp32" else {})
    teacher = frozen_teacher(load_backbone(config.model, config.task), config.task.kind)
    tokenizer = load_source_tokenizer(config.model)
    vocab = teacher.backbone.config.vocab_size
    inputs, fallback = build_eval_inputs(config.task, config.validate, config.calib.seed, tokenizer, vocab)
    if fallback:
        raise click.ClickException(f"the benchmark needs task data: {fallback}")
    started = time.perf_counter()
    record: LearningRecord = {}
    if row.method in STUDENTS:
        model: TaskModel | None
        model, record = STUDENTS[row.method](config, teacher, tokenizer)
        metric, outputs = evaluate_torch(model, inputs)
    else:
        model = teacher if row.method == "fp32" else None  # a peer's row already scored its ONNX graph
        metric, outputs = PROCEDURES[row.method](config, teacher, tokenizer, inputs)
    minutes = 0.0 if row.method == "fp32" else (time.perf_counter() - started) / 60
    result = {"metric": metric, "minutes": round(minutes, 3), "peak_gib": round(_peak_gib(), 3), "seed": seed}
    if spec.fidelity:
        result["fidelity"] = fidelity(evaluate_torch(teacher, inputs)[1], outputs, config.task.kind)
    if spec.exported:
        result |= {"exported_metric": metric} if model is None else _exported_metric(config, teacher, model, inputs)
    return {**result, **record, "machine": machine_description()}


def measure_formats(base: PipelineConfig, repeats: int) -> dict[str, Any]:
    """Speed-up over FP32 (median latency, side by side in one run) and file size of each CPU format."""
    teacher = frozen_teacher(load_backbone(base.model, base.task), base.task.kind)
    formats = ("ort-dynamic", *FORMAT_SCHEMES, "w4a16")
    threads = base.validate.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="zsaq-bench-") as tmp:
        seq_len = max(s for _, s in base.validate.shapes)
        paths = cpu_format_graphs(teacher, formats, Path(tmp), base.export.opset, seq_len)
        vocab = teacher.backbone.config.vocab_size
        feeds = sample_feeds(random_tokens(16, seq_len, vocab, seed=0))
        peers, unavailable = peer_format_graphs(paths["fp32"], Path(tmp), feeds)
        paths |= peers
        result = speedups(paths, base.validate.shapes, repeats, vocab, dict.fromkeys(paths, threads))
    return {**result, "unavailable": unavailable, "threads": threads, "machine": machine_description()}


@click.command()
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--task", "task_name", help="Task name in the spec; omit with --latency.")
@click.option("--row", "row_key", help="Row key in the spec; omit with --latency.")
@click.option("--seed", type=int, default=0)
@click.option("--latency", is_flag=True, help="Measure the CPU formats of the spec's latency model instead.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def main(spec_path: Path, task_name: str | None, row_key: str | None, seed: int, latency: bool, out: Path) -> None:
    """Run one cell and write its JSON (through a temporary name: a killed cell leaves no file)."""
    spec = load_spec(spec_path)
    if latency:
        result = measure_formats(load_config(spec.latency_config), spec.latency_repeats)
    else:
        task = next(t for t in spec.tasks if t.name == task_name)
        result = run_cell(spec, task, next(r for r in spec.rows if r.key == row_key), seed)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
