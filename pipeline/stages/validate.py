"""Stage 6: validate every model against the PyTorch student and the FP teacher; write the report."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calib.contract import load_contract, load_student
from calib.errors import ThresholdFailed
from calib.registry import METHODS
from calib.student import freeze_weights
from calib.task_data import REAL_DATA_FLAG
from exporters.decoder_checks import decoder_report, prompt_ids
from exporters.decoding import OrtStepper
from exporters.onnx_qdq import FLAVOURS
from exporters.runners import OrtRunner, Runner, TorchRunner, TorchStepper
from exporters.validation import GENERATED_SEED_OFFSET, EvalInputs, build_eval_inputs, validate_models
from pipeline.layout import ORT_DYNAMIC_ONNX, STUDENT_ONNX, TEACHER_MODEL, TEACHER_ONNX, int4_weight_only_onnx
from pipeline.report import write_report
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.quantize import quant_label

STUDENT = "student-pytorch"
FP32_PYTORCH = "fp32-pytorch"
FP32_ONNX = "fp32-onnx"
ORT_DYNAMIC = "ort-dynamic-int8"


def _opener(runner: OrtRunner) -> Callable[[], OrtStepper]:
    """Opens the runner's cached-graph stepper, the runner letting its session go (the caller holds the only
    reference, so the graph leaves memory when the caller drops it)."""

    def open_stepper() -> OrtStepper:
        stepper = runner.decoder
        runner.close()
        return stepper

    return open_stepper


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def student_label(flavour: str) -> str:
    """The report's name for the student graph of one flavour (``cpu``, ``trt``)."""
    return f"qdq-{flavour}-flavour"


class ValidateStage(Stage):
    """Writes ``validate/report.json``, ``report.md`` and ``plot.png``."""

    name = "validate"
    requires = ("teacher", "quantize", "export")
    reads = (
        "model", "task", "calib.method", "calib.seed", "quant", "validate", "export.int4_weight_only",
        "export.ort_dynamic_baseline",
    )  # fmt: skip

    def run(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config
        threads = config.validate.threads or os.cpu_count() or 1
        teacher = ctx.teacher()
        # weights quantized once: validation only runs the student (a decoder's greedy reference calls it per token)
        student = freeze_weights(load_student(teacher, config.quant, load_contract(ctx.run.stage_dir("quantize"))))
        vocab = teacher.backbone.config.vocab_size
        inputs, fallback = build_eval_inputs(config.task, config.validate, config.calib.seed, ctx.tokenizer(), vocab)
        if fallback:
            ctx.log(f"[validate] no task metric: {fallback}; measuring agreement on generated inputs")
        weights_bytes = _folder_bytes(ctx.path(TEACHER_MODEL))
        runners = [
            TorchRunner(FP32_PYTORCH, teacher, weights_bytes, threads),
            TorchRunner(STUDENT, student, weights_bytes, threads),
        ]
        labels = {TEACHER_ONNX: FP32_ONNX, **{a: student_label(name) for name, a in STUDENT_ONNX.items()}}
        # The int4 weight-only models and ORT's dynamic int8 baseline quantize the teacher, not the student:
        # they agree with the FP teacher (validate.min_agreement, a check of the student's exports, skips them).
        teacher_rows = {int4_weight_only_onnx(g): f"w4a16-g{g}-cpu" for g in config.export.int4_weight_only}
        if config.export.ort_dynamic_baseline:
            teacher_rows[ORT_DYNAMIC_ONNX] = ORT_DYNAMIC
        labels.update(teacher_rows)
        references = {label: FP32_PYTORCH for label in teacher_rows.values()}
        # a flavour checked by the ONNX definition of Q/DQ (int32 accumulation, as TensorRT computes), not by
        # ORT's fused int8 CPU kernels, which saturate on AVX2-only CPUs
        reference_qdq = {STUDENT_ONNX[name]: f.reference_qdq for name, f in FLAVOURS.items()}
        for artifact, label in labels.items():
            if ctx.path(artifact).is_file():
                reference = reference_qdq.get(artifact, False)
                runners.append(OrtRunner(label, ctx.path(artifact), threads, reference_qdq=reference))
        torch.manual_seed(0)
        # a decoder's graphs are large (SmolLM2: six of 0.2-0.6 GB): one is open at a time, timed alone
        decoder = config.task.kind == "causal-lm"
        reports = validate_models(
            runners, STUDENT, inputs, config.validate, vocab, config.task.kind, references, one_at_a_time=decoder
        )
        baseline = next((r for r in reports if r.name == FP32_ONNX), None)
        rows = []
        for r in reports:
            row = asdict(r)
            if baseline is not None:
                row["speedup_vs_fp32_onnx"] = [
                    round(base["p50_ms"] / lat["p50_ms"], 3) for base, lat in zip(baseline.latency, r.latency)
                ]
            rows.append(row)
        failures = self._threshold_failures(rows, config.validate.min_agreement)
        decoding = None
        if config.task.kind == "causal-lm":
            decoding = self._decoder_checks(ctx, runners, inputs, {**references, FP32_ONNX: FP32_PYTORCH})
        report = {
            "model": config.model.describe(),
            "task": config.task.kind,
            "scheme": quant_label(config),
            "metric_name": inputs.metric,
            "inputs": inputs.source,
            "fallback_reason": fallback,
            "reference": STUDENT,
            "calibration": config.calib.method
            + (f" ({REAL_DATA_FLAG})" if METHODS[config.calib.method].uses_data else ""),
            "threads": threads,
            "repeats": config.validate.repeats,
            "shapes": [list(s) for s in config.validate.shapes],
            "models": rows,
            "threshold_failures": failures,
            "decoding": decoding,
        }
        write_report(report, ctx.out)
        if failures:
            raise ThresholdFailed("validate: " + "; ".join(failures))
        return {r["name"]: {"metric": r["metric"], "speedup": r.get("speedup_vs_fp32_onnx")} for r in rows}

    @staticmethod
    def _decoder_checks(
        ctx: StageContext, runners: list[Runner], inputs: EvalInputs, references: dict[str, str]
    ) -> dict[str, Any]:
        """Generation checks of every cached graph (:func:`exporters.decoder_checks.decoder_report`): the student's
        exports against the student's greedy tokens, the teacher's graphs (``references``) against the FP
        teacher's."""
        settings = ctx.config.validate.decoder
        torch_models = {r.name: TorchStepper(r.model, r.threads) for r in runners if isinstance(r, TorchRunner)}
        graphs = {r.name: _opener(r) for r in runners if isinstance(r, OrtRunner)}
        reference_of = {name: references.get(name, STUDENT) for name in graphs}
        vocab = ctx.teacher().backbone.config.vocab_size
        seed = ctx.config.calib.seed + GENERATED_SEED_OFFSET
        prompts = prompt_ids(ctx.tokenizer(), vocab, settings.prompts, seed)
        windows = np.concatenate([ids for ids, _ in inputs.batches_a])[: settings.cache_windows]
        ctx.log(f"[validate] decoding: {len(prompts)} prompts x {settings.new_tokens} greedy tokens, cache checks")
        return decoder_report(graphs, torch_models, reference_of, prompts, windows, settings)

    @staticmethod
    def _threshold_failures(rows: list[dict[str, Any]], minimum: float | None) -> list[str]:
        """Only the student's exports answer to ``min_agreement`` (rows measured against the student)."""
        if minimum is None:
            return []
        failures = []
        for row in rows:
            agree = row["agreement"]
            if not agree or row["reference"] != STUDENT or row["name"] in (FP32_PYTORCH, FP32_ONNX):
                continue
            key = "argmax_match" if "argmax_match" in agree else "mean_cosine"
            if agree[key] < minimum:
                failures.append(f"{row['name']}: {key} {agree[key]:.4f} is below validate.min_agreement {minimum}")
        return failures
