"""Stage 6: validate every model against the PyTorch student and the FP teacher; write the report."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch

from calib.contract import load_contract, load_student
from exporters.runners import OrtRunner, TorchRunner
from exporters.validation import build_eval_inputs, validate_models
from pipeline.errors import ThresholdFailed
from pipeline.report import write_report
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.calibrate import REAL_DATA_FLAG
from pipeline.stages.export import ORT_DYNAMIC_ONNX, STUDENT_ONNX, TEACHER_ONNX, int4_filename
from pipeline.stages.quantize import quant_label
from pipeline.stages.teacher import MODEL_DIR, load_teacher, load_teacher_tokenizer

STUDENT = "student-pytorch"
FP32_PYTORCH = "fp32-pytorch"
FP32_ONNX = "fp32-onnx"
ORT_DYNAMIC = "ort-dynamic-int8"


def _folder_bytes(folder) -> int:  # noqa: ANN001
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


class ValidateStage(Stage):
    """Writes ``validate/report.json``, ``report.md`` and ``plot.png``."""

    name = "validate"
    requires = ("teacher", "quantize", "export")
    config_sections = ("model", "task", "calib", "quant", "export", "validate")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config
        threads = config.validate.threads or os.cpu_count() or 1
        teacher = load_teacher(ctx)
        student = load_student(teacher, config.quant, load_contract(ctx.input_dir("quantize")))
        teacher_dir = ctx.input_dir("teacher") / MODEL_DIR
        tokenizer = load_teacher_tokenizer(ctx)
        vocab = teacher.backbone.config.vocab_size
        inputs, fallback = build_eval_inputs(config, tokenizer, vocab)
        if fallback:
            ctx.log(f"[validate] no task metric: {fallback}; measuring agreement on generated inputs")
        weights_bytes = _folder_bytes(teacher_dir)
        runners = [
            TorchRunner(FP32_PYTORCH, teacher, weights_bytes, threads),
            TorchRunner(STUDENT, student, weights_bytes, threads),
        ]
        export_dir = ctx.input_dir("export")
        labels = {
            TEACHER_ONNX: FP32_ONNX,
            STUDENT_ONNX["trt"]: "qdq-trt-flavour",
            STUDENT_ONNX["cpu"]: "qdq-cpu-flavour",
        }
        # The int4 weight-only models and ORT's dynamic int8 baseline quantize the teacher, not the student:
        # they agree with the FP teacher (validate.min_agreement, a check of the student's exports, skips them).
        teacher_rows = {int4_filename(group): f"w4a16-g{group}-cpu" for group in config.export.int4_weight_only}
        if config.export.ort_dynamic_baseline:
            teacher_rows[ORT_DYNAMIC_ONNX] = ORT_DYNAMIC
        labels.update(teacher_rows)
        references = {label: FP32_PYTORCH for label in teacher_rows.values()}
        for filename, label in labels.items():
            if (export_dir / filename).is_file():
                # the TensorRT flavour is checked by the ONNX definition of Q/DQ (int32 accumulation, as
                # TensorRT computes): ORT's fused int8 CPU kernels saturate on AVX2-only CPUs
                reference = filename == STUDENT_ONNX["trt"]
                runners.append(OrtRunner(label, export_dir / filename, threads, reference_qdq=reference))
        torch.manual_seed(0)
        reports = validate_models(runners, STUDENT, inputs, config, vocab, config.task.kind, references)
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
        report = {
            "model": config.model.describe(),
            "task": config.task.kind,
            "scheme": quant_label(config),
            "metric_name": inputs.metric,
            "inputs": inputs.source,
            "fallback_reason": fallback,
            "reference": STUDENT,
            "calibration": config.calib.method + (f" ({REAL_DATA_FLAG})" if config.calib.method == "real-data" else ""),
            "threads": threads,
            "repeats": config.validate.repeats,
            "shapes": [list(s) for s in config.validate.shapes],
            "models": rows,
            "threshold_failures": failures,
        }
        write_report(report, ctx.out)
        if failures:
            raise ThresholdFailed("validate: " + "; ".join(failures))
        return {r["name"]: {"metric": r["metric"], "speedup": r.get("speedup_vs_fp32_onnx")} for r in rows}

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
