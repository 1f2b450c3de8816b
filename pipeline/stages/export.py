"""Stage 4: ONNX artifacts: the FP32 teacher baseline and the student's Q/DQ graphs (TensorRT and CPU flavours)."""

from __future__ import annotations

from typing import Any

import onnx
from onnxruntime.quantization import quantize_dynamic

from calib.contract import build_contract, load_contract
from calib.inputs import Batch
from calib.models import TaskModel
from calib.student import build_student, init_ranges
from exporters.cpu_kernels import cpu_int8_weight_type
from exporters.onnx_export import contract_float_graph, export_onnx, teacher_export_model
from exporters.onnx_qdq import ExportUnsupported, Flavour, quantize_graph, required_opset
from exporters.trt_check import check_trt_compatible
from pipeline.config import ActivationQuant, QuantConfig, WeightQuant
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.teacher import load_teacher

TEACHER_ONNX = "teacher_fp32.onnx"
ORT_DYNAMIC_ONNX = "teacher_ort_dynamic_int8.onnx"
STUDENT_ONNX = {"trt": "student_qdq_trt.onnx", "cpu": "student_qdq_cpu.onnx"}


def int4_filename(group: int) -> str:
    """The CPU model of the teacher with int4 weights in groups of ``group`` (W4A16, MatMulNBits)."""
    return f"teacher_w4a16_g{group}_cpu.onnx"


def round_to_nearest_graph(
    teacher: TaskModel, quant: QuantConfig, batches: list[Batch], flavour: Flavour, opset: int
) -> onnx.ModelProto:
    """A quantized graph with ranges initialised on ``batches`` and no learning (round to nearest)."""
    student = build_student(teacher, quant)
    init_ranges(student, quant, batches)
    contract = build_contract(student)
    return quantize_graph(contract_float_graph(teacher, contract, opset), contract, flavour)


def int4_weight_only_quant(teacher: TaskModel, group: int) -> QuantConfig:
    """Round-to-nearest int4 weights per group (min-max), int8 embedding rows unless tied to an LM head.

    Weight-only quantization needs no activation ranges, hence no calibration inputs: the student path
    is reused with 16-bit activations so the numbers still come from a contract."""
    tied = teacher.kind == "causal-lm" and getattr(teacher.backbone.config, "tie_word_embeddings", False)
    return QuantConfig(
        weights=WeightQuant(bits=4, granularity="per-group", group_size=group),
        activations=ActivationQuant(bits=16),
        embedding_bits=None if tied else 8,
    )


def int4_weight_only_graph(teacher: TaskModel, group: int, opset: int) -> onnx.ModelProto:
    """The W4A16 CPU model of the teacher (:func:`int4_weight_only_quant`)."""
    return round_to_nearest_graph(teacher, int4_weight_only_quant(teacher, group), [], "cpu", opset)


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
        float_graph = contract_float_graph(teacher, contract, opset)
        summary: dict[str, Any] = {
            "teacher": TEACHER_ONNX,
            "teacher_megabytes": round((ctx.out / TEACHER_ONNX).stat().st_size / 2**20, 2),
            "opset": max(opset, required_opset(contract)),
        }
        export = ctx.config.export
        int8_weights = cpu_int8_weight_type(export.cpu_int8_weights)  # resolved once: graph and summary agree
        try:
            for flavour, filename in STUDENT_ONNX.items():
                graph = quantize_graph(float_graph, contract, flavour, export.int4_accuracy_level, int8_weights)
                onnx.save(graph, str(ctx.out / filename))
                summary[flavour] = {
                    "file": filename,
                    "quantize_linear": count_ops(graph, "QuantizeLinear"),
                    "dequantize_linear": count_ops(graph, "DequantizeLinear"),
                    "matmul_nbits": count_ops(graph, "MatMulNBits"),
                    "megabytes": round((ctx.out / filename).stat().st_size / 2**20, 2),
                }
                if flavour == "cpu":
                    summary["cpu"]["int8_weights"] = int8_weights
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
        if ctx.config.export.ort_dynamic_baseline:
            # per-channel int8 weights, activations quantized at run time (uint8, per tensor): ORT's own tool
            quantize_dynamic(ctx.out / TEACHER_ONNX, ctx.out / ORT_DYNAMIC_ONNX, per_channel=True)
            summary["ort_dynamic_int8"] = {
                "file": ORT_DYNAMIC_ONNX,
                "megabytes": round((ctx.out / ORT_DYNAMIC_ONNX).stat().st_size / 2**20, 2),
            }
        for group in ctx.config.export.int4_weight_only:
            path = ctx.out / int4_filename(group)
            onnx.save(int4_weight_only_graph(teacher, group, opset), str(path))
            summary[f"w4a16_g{group}"] = {
                "file": path.name,
                "megabytes": round(path.stat().st_size / 2**20, 2),
                "fraction_of_fp32": round(path.stat().st_size / (ctx.out / TEACHER_ONNX).stat().st_size, 3),
            }
        return summary
