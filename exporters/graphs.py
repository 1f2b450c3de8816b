"""ONNX graphs of a teacher from the library's recipes: round-to-nearest and int4 weight-only graphs (no
calibration), ONNX Runtime's dynamic int8, and the CPU formats a teacher is timed in."""

from __future__ import annotations

from pathlib import Path

import onnx

from calib.config import ActivationQuant, QuantConfig, WeightQuant
from calib.contract import build_contract
from calib.inputs import Batch, random_tokens
from calib.methods import int4_weight_only_quant, quantize_student
from calib.models import TaskModel
from exporters.onnx_export import contract_float_graph, export_onnx, teacher_export_model
from exporters.onnx_qdq import Flavour, quantize_graph


def student_graph(
    teacher: TaskModel,
    student: TaskModel,
    flavour: Flavour | str,
    opset: int,
    int4_accuracy_level: int = 0,
    cpu_int8_weights: str = "auto",
) -> onnx.ModelProto:
    """A student's graph in ``flavour``, from its contract, as the export stage writes it."""
    contract = build_contract(student)
    float_graph = contract_float_graph(teacher, contract, opset)
    return quantize_graph(float_graph, contract, flavour, int4_accuracy_level, cpu_int8_weights)


def round_to_nearest_graph(
    teacher: TaskModel, quant: QuantConfig, batches: list[Batch], flavour: Flavour | str, opset: int
) -> onnx.ModelProto:
    """A quantized graph with ranges initialised on ``batches`` and weights rounded (``quant.learn`` at its
    default: no learning)."""
    return student_graph(teacher, quantize_student(teacher, quant, batches, show_progress=False)[0], flavour, opset)


def int4_weight_only_graph(teacher: TaskModel, group: int, opset: int) -> onnx.ModelProto:
    """The W4A16 CPU model of the teacher (:func:`calib.methods.int4_weight_only_quant`)."""
    return round_to_nearest_graph(teacher, int4_weight_only_quant(teacher, group), [], "cpu", opset)


def ort_dynamic_graph(fp32: Path, out: Path) -> None:
    """ONNX Runtime's own dynamic int8 of an FP32 graph (per-channel int8 weights, activations quantized at
    run time): the data-free option users have today, the bar the student must beat."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(fp32, out, per_channel=True)


# CPU formats timed against FP32 (bench tables, the latency check): W{bits}A{bits} round-to-nearest students on
# the int8 kernels (int4 per channel too: its integers fit int8), W4A16 as the export stage's int4 model.
FORMAT_SCHEMES = {"w8a8": (8, 8), "w4a8": (4, 8), "w8a16": (8, 16)}
WEIGHT_ONLY_GROUP = 32


def cpu_format_graphs(
    teacher: TaskModel, names: tuple[str, ...], folder: Path, opset: int, seq_len: int
) -> dict[str, Path]:
    """``fp32.onnx`` and each named format (``ort-dynamic``, ``w4a16`` or a :data:`FORMAT_SCHEMES` key) in
    ``folder``. Ranges come from min-max on random tokens: latency does not depend on their values."""
    batches = random_tokens(16, seq_len, teacher.backbone.config.vocab_size, seed=0).batches(8)
    paths = {"fp32": folder / "fp32.onnx"}
    export_onnx(teacher_export_model(teacher), paths["fp32"], opset)
    for name in names:
        paths[name] = folder / f"{name}.onnx"
        if name == "ort-dynamic":
            ort_dynamic_graph(paths["fp32"], paths[name])
        elif name == "w4a16":
            onnx.save(int4_weight_only_graph(teacher, WEIGHT_ONLY_GROUP, opset), str(paths[name]))
        else:
            w_bits, a_bits = FORMAT_SCHEMES[name]
            quant = QuantConfig(
                weights=WeightQuant(bits=w_bits), activations=ActivationQuant(bits=a_bits, init="minmax")
            )
            onnx.save(round_to_nearest_graph(teacher, quant, batches, "cpu", opset), str(paths[name]))
    return paths
