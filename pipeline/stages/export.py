"""Stage 4: ONNX artifacts: the FP32 teacher baseline, the student's Q/DQ graph in every flavour, and the
teacher's comparison models (int4 weight-only, ONNX Runtime's dynamic int8)."""

from __future__ import annotations

from typing import Any

import onnx

from calib.contract import load_contract
from exporters.cpu_kernels import cpu_int8_weight_type
from exporters.graphs import int4_weight_only_graph, ort_dynamic_graph
from exporters.onnx_export import contract_float_graph, export_onnx, teacher_export_model
from exporters.onnx_qdq import (
    FLAVOURS,
    ExportUnsupported,
    Flavour,
    check_exportable,
    flavour_unsupported,
    quantize_graph,
    required_opset,
)
from pipeline.layout import ORT_DYNAMIC_ONNX, STUDENT_ONNX, TEACHER_ONNX, int4_weight_only_onnx
from pipeline.stages.base import Stage, StageContext


def count_ops(model: onnx.ModelProto, *op_types: str) -> int:
    """How many nodes of the given types the graph holds."""
    return sum(1 for node in model.graph.node if node.op_type in op_types)


def _megabytes(path: Any) -> float:
    return round(path.stat().st_size / 2**20, 2)


class ExportStage(Stage):
    """Writes ``export/teacher_fp32.onnx`` and, where ONNX Runtime runs the scheme, the student in each flavour.

    ``export.formats`` is not read: which engines are built or packaged from these graphs changes none of them."""

    name = "export"
    requires = ("teacher", "quantize")
    reads = ("export.opset", "export.int4_accuracy_level", "export.cpu_int8_weights", "export.int4_weight_only",
             "export.ort_dynamic_baseline")  # fmt: skip

    def run(self, ctx: StageContext) -> dict[str, Any]:
        export = ctx.config.export
        opset = export.opset
        teacher = ctx.teacher()
        teacher_onnx = ctx.out / TEACHER_ONNX.name
        export_onnx(teacher_export_model(teacher), teacher_onnx, opset)
        contract = load_contract(ctx.run.stage_dir("quantize"))
        float_graph = contract_float_graph(teacher, contract, opset)
        summary: dict[str, Any] = {
            "teacher": TEACHER_ONNX.name,
            "teacher_megabytes": _megabytes(teacher_onnx),
            "opset": max(opset, required_opset(contract)),
        }
        int8_weights = cpu_int8_weight_type(export.cpu_int8_weights)  # resolved once: graph and summary agree
        try:
            check_exportable(contract)
        except ExportUnsupported as exc:
            summary["student"] = f"not exported: {exc}"
            ctx.log(f"[export] {summary['student']}")
        else:
            for name, artifact in STUDENT_ONNX.items():
                problem = flavour_unsupported(contract, FLAVOURS[name])
                if problem is not None:
                    summary[name] = f"not exported: {problem}"
                    ctx.log(f"[export] {name} flavour {summary[name]}")
                    continue
                graph = quantize_graph(float_graph, contract, name, export.int4_accuracy_level, int8_weights)
                onnx.save(graph, str(ctx.out / artifact.name))
                summary[name] = self._graph_summary(graph, FLAVOURS[name], ctx, artifact.name)
                if FLAVOURS[name].fused_kernels:
                    summary[name]["int8_weights"] = int8_weights
        if export.ort_dynamic_baseline:
            ort_dynamic_graph(teacher_onnx, ctx.out / ORT_DYNAMIC_ONNX.name)
            summary["ort_dynamic_int8"] = {
                "file": ORT_DYNAMIC_ONNX.name,
                "megabytes": _megabytes(ctx.out / ORT_DYNAMIC_ONNX.name),
            }
        for group in export.int4_weight_only:
            path = ctx.out / int4_weight_only_onnx(group).name
            onnx.save(int4_weight_only_graph(teacher, group, opset), str(path))
            summary[f"w4a16_g{group}"] = {
                "file": path.name,
                "megabytes": _megabytes(path),
                "fraction_of_fp32": round(path.stat().st_size / teacher_onnx.stat().st_size, 3),
            }
        return summary

    @staticmethod
    def _graph_summary(graph: onnx.ModelProto, flavour: Flavour, ctx: StageContext, filename: str) -> dict[str, Any]:
        """Op counts and size of one flavour's graph, and what its runtime's lint finds (TensorRT's rules for a
        graph that ONNX Runtime runs either way)."""
        summary: dict[str, Any] = {
            "file": filename,
            "quantize_linear": count_ops(graph, "QuantizeLinear"),
            "dequantize_linear": count_ops(graph, "DequantizeLinear"),
            "matmul_nbits": count_ops(graph, "MatMulNBits"),
            "megabytes": _megabytes(ctx.out / filename),
        }
        if flavour.lint is not None:
            problems = flavour.lint(graph)
            summary[f"{flavour.runtime}_check"] = problems or "ok"
            for problem in problems:
                ctx.log(f"[export] {flavour.runtime} check: {problem}")
        return summary
