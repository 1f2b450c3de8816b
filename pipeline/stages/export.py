"""Stage 4: ONNX artifacts: the FP32 teacher baseline and the student's Q/DQ graphs (TensorRT and CPU flavours)."""

from __future__ import annotations

from typing import Any

import onnx

from calib.contract import load_contract
from exporters.onnx_export import contract_export_model, export_onnx, teacher_export_model
from exporters.onnx_qdq import ExportUnsupported, quantize_graph, required_opset
from exporters.trt_check import check_trt_compatible
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.teacher import load_teacher

TEACHER_ONNX = "teacher_fp32.onnx"
STUDENT_ONNX = {"trt": "student_qdq_trt.onnx", "cpu": "student_qdq_cpu.onnx"}


def count_ops(model: onnx.ModelProto, *op_types: str) -> int:
    """How many nodes of the given types the graph holds."""
    return sum(1 for node in model.graph.node if node.op_type in op_types)


class ExportStage(Stage):
    """Writes ``export/teacher_fp32.onnx`` and, where a runtime exists for the bit width, the student graphs."""

    name = "export"
    requires = ("teacher", "quantize")
    config_sections = ("model", "task", "calib", "quant", "export")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        opset = ctx.config.export.opset
        teacher = load_teacher(ctx)
        export_onnx(teacher_export_model(teacher), ctx.out / TEACHER_ONNX, opset)
        contract = load_contract(ctx.input_dir("quantize"))
        skeleton_path = ctx.out / ".student_float.onnx"
        float_graph = export_onnx(contract_export_model(teacher, contract), skeleton_path, opset)
        skeleton_path.unlink()
        summary: dict[str, Any] = {
            "teacher": TEACHER_ONNX,
            "teacher_megabytes": round((ctx.out / TEACHER_ONNX).stat().st_size / 2**20, 2),
            "opset": max(opset, required_opset(contract)),
        }
        try:
            for flavour, filename in STUDENT_ONNX.items():
                graph = quantize_graph(float_graph, contract, flavour, ctx.config.export.int4_accuracy_level)
                onnx.save(graph, str(ctx.out / filename))
                summary[flavour] = {
                    "file": filename,
                    "quantize_linear": count_ops(graph, "QuantizeLinear"),
                    "dequantize_linear": count_ops(graph, "DequantizeLinear"),
                    "matmul_nbits": count_ops(graph, "MatMulNBits"),
                    "megabytes": round((ctx.out / filename).stat().st_size / 2**20, 2),
                }
                if flavour == "trt":
                    problems = check_trt_compatible(graph)
                    summary["trt"]["tensorrt_check"] = problems or "ok"
                    for problem in problems:
                        ctx.log(f"[export] TensorRT check: {problem}")
        except ExportUnsupported as exc:
            for filename in STUDENT_ONNX.values():
                (ctx.out / filename).unlink(missing_ok=True)
            summary["student"] = f"not exported: {exc}"
            ctx.log(f"[export] {summary['student']}")
        return summary
