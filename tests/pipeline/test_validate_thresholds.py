"""validate.min_agreement applies to the student's exports only, never to rows that quantize the teacher."""

from __future__ import annotations

from pipeline.stages.validate import FP32_ONNX, FP32_PYTORCH, STUDENT, ValidateStage


def _row(name: str, reference: str, match: float | None) -> dict:
    return {"name": name, "reference": reference, "agreement": None if match is None else {"argmax_match": match}}


def test_only_rows_measured_against_the_student_answer_to_the_threshold():
    rows = [
        _row(FP32_PYTORCH, STUDENT, 0.90),
        _row(STUDENT, STUDENT, None),
        _row(FP32_ONNX, STUDENT, 0.90),
        _row("qdq-cpu-flavour", STUDENT, 0.95),
        _row("qdq-trt-flavour", STUDENT, 0.995),
        _row("w4a16-g32-cpu", FP32_PYTORCH, 0.90),
        _row("ort-dynamic-int8", FP32_PYTORCH, 0.90),
    ]
    failures = ValidateStage._threshold_failures(rows, 0.99)
    assert failures == ["qdq-cpu-flavour: argmax_match 0.9500 is below validate.min_agreement 0.99"]
    assert ValidateStage._threshold_failures(rows, None) == []
