"""Float ONNX export of a task model, each quantizable layer a MatMul on a weight named after the layer
(``backbone.<layer>.weight_t``, how :mod:`exporters.onnx_qdq` finds a contract entry's MatMul). The FP32
baseline and the quantized graphs come out of the same function, so their structure is the same."""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnx import version_converter
from torch import nn

from calib.contract import Contract, dequantized_embedding, dequantized_weight, float_state_dict
from calib.hadamard import OnlineHadamard
from calib.models import TaskModel
from calib.placement import quantizable_layers
from calib.quant_linear import linear_weight
from calib.rotation import online_rotations, untie_head
from exporters.decoding import CACHED_INPUTS, LOGITS
from exporters.kv_cache import CachedCausalLM, cache_layout

INPUT_NAMES = ("input_ids", "attention_mask")


def weight_initializer_name(layer: str) -> str:
    """The ONNX initializer name of a quantizable layer's ``[in, out]`` weight."""
    return f"backbone.{layer}.weight_t"


class ExportLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W^T`` stored as a named buffer (``[in, out]``, MatMul's layout)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, input_rotation: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight.detach().t().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_rotation = input_rotation  # calib.rotation's online Hadamard, exported as float MatMuls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def _swap(backbone: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(backbone.get_submodule(parent_name), child, module)


def teacher_export_model(teacher: TaskModel) -> TaskModel:
    """The teacher with its quantizable layers as :class:`ExportLinear` (the same float function)."""
    model = copy.deepcopy(teacher)
    for name in quantizable_layers(model.backbone):
        layer = model.backbone.get_submodule(name)
        _swap(model.backbone, name, ExportLinear(linear_weight(layer), layer.bias))
    return model


def contract_export_model(teacher: TaskModel, contract: Contract) -> TaskModel:
    """The student's float skeleton: contract float tensors, and dequantized weights on the named MatMuls."""
    model = copy.deepcopy(teacher)
    if contract.attention:  # the attention matmuls must appear as plain MatMuls for their Q/DQ
        model.backbone.set_attn_implementation("eager")
    rotation = contract.rotation or {}
    if rotation.get("untied_head"):  # the rotated head differs from the rotated table (calib.rotation)
        untie_head(model.backbone, rotation["head_bias"])
    model.backbone.load_state_dict(float_state_dict(contract), strict=False)
    with torch.no_grad():
        for name in contract.embeddings:
            model.backbone.get_submodule(name).weight.copy_(dequantized_embedding(contract, name))
    online = online_rotations(rotation)
    for spec in contract.layers:
        bias = contract.tensors.get(f"{spec.name}.bias")
        rotate = OnlineHadamard(spec.in_features) if spec.name in online else None
        _swap(model.backbone, spec.name, ExportLinear(dequantized_weight(contract, spec), bias, rotate))
    return model


def _trace_arguments(model: TaskModel, example_seq_len: int) -> tuple[nn.Module, tuple, list[str], list[str], dict]:
    """What to trace: a causal LM with its KV cache (:mod:`exporters.kv_cache`), any other model as
    ``(input_ids, attention_mask) -> output``."""
    if model.kind == "causal-lm":
        cached = CachedCausalLM(model, cache_layout(model)).eval()
        inputs = cached.example_inputs(2, example_seq_len, past_len=3)
        outputs = [LOGITS, *cached.layout.present_names]
        return cached, inputs, [*CACHED_INPUTS, *cached.layout.past_names], outputs, cached.dynamic_axes()
    ids = torch.ones(2, example_seq_len, dtype=torch.long)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {model.output_name: {0: "batch"}}
    return model, (ids, torch.ones_like(ids)), list(INPUT_NAMES), [model.output_name], axes


def export_onnx(model: TaskModel, path: Path, opset: int, example_seq_len: int = 16) -> onnx.ModelProto:
    """Export with dynamic axes (a causal LM with its KV cache); returns the checked model (also at ``path``)."""
    module, inputs, input_names, output_names, dynamic_axes = _trace_arguments(model.eval(), example_seq_len)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=min(opset, 17),
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    if opset > 17:  # the legacy exporter writes 17; a newer opset asked for is a conversion of that graph
        proto = version_converter.convert_version(proto, opset)
        onnx.save(proto, str(path))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def contract_float_graph(teacher: TaskModel, contract: Contract, opset: int) -> onnx.ModelProto:
    """The student's float skeleton (:func:`contract_export_model`) as a checked ONNX graph in memory,
    the input of :func:`exporters.onnx_qdq.quantize_graph` (exported through a temporary file)."""
    with tempfile.TemporaryDirectory(prefix="zsaq-export-") as tmp:
        return export_onnx(contract_export_model(teacher, contract), Path(tmp) / "float.onnx", opset)
