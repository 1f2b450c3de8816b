"""The TensorRT-compatibility check passes the exporter's ``trt`` graphs and names what breaks a broken one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.config import QuantConfig, WeightQuant
from calib.contract import build_contract
from calib.inputs import random_tokens
from calib.student import build_student, init_ranges
from exporters.onnx_export import contract_export_model, export_onnx
from exporters.onnx_qdq import quantize_graph
from exporters.trt_check import TrtIncompatible, check_trt_compatible, require_trt_compatible
from tests.models import tiny_teacher

K, N, BLOCK = 128, 6, 64


def _model(bits: int = 8, n: int = N, opset: int | None = None) -> onnx.ModelProto:
    """``x -> Q -> DQ -> MatMul(., DQ(w))``, TensorRT-clean: int8 per output channel, or int4 blocked by 64."""
    if bits == 8:
        w_type, scale_shape, attrs = TensorProto.INT8, (n,), {"axis": 1}
    else:
        w_type, scale_shape, attrs = TensorProto.INT4, (K // BLOCK, n), {"axis": 0, "block_size": BLOCK}
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        helper.make_tensor("w", w_type, (K, n), np.resize([-3, 1, 2], K * n).tolist()),
        numpy_helper.from_array(np.full(scale_shape, 0.01, np.float32), "w_scale"),
        helper.make_tensor("w_zero", w_type, scale_shape, np.zeros(scale_shape, int).flatten().tolist()),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="x_q"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], name="w_dq", **attrs),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        inits,
    )
    default_opset = 17 if bits == 8 else 21
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset or default_opset)])


def _replace(model: onnx.ModelProto, name: str, dtype: int, values: np.ndarray) -> onnx.ModelProto:
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(helper.make_tensor(name, dtype, values.shape, values.flatten().tolist()))
    return model


def _set_attrs(model: onnx.ModelProto, node_name: str, **attrs: int) -> onnx.ModelProto:
    node = next(n for n in model.graph.node if n.name == node_name)
    del node.attribute[:]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    return model


def _weight_scales(model: onnx.ModelProto, w_type: int, shape: tuple[int, ...], **attrs: int) -> onnx.ModelProto:
    """Give the weight DequantizeLinear scales (0.01) and zero points of ``shape``, and ``attrs``."""
    _replace(model, "w_scale", TensorProto.FLOAT, np.full(shape, 0.01, np.float32))
    _replace(model, "w_zero", w_type, np.zeros(shape, np.int8))
    return _set_attrs(model, "w_dq", **attrs)


def _weight_as_first_input(model: onnx.ModelProto) -> onnx.ModelProto:
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    matmul.input[:] = ["wd", "xd"]
    return model


BROKEN = {
    "non-zero zero point": (
        lambda: _replace(_model(), "x_zero", TensorProto.INT8, np.array(3, np.int8)),
        "non-zero zero point",
    ),
    "uint8 activation": (
        lambda: _replace(_model(), "x_zero", TensorProto.UINT8, np.array(128, np.uint8)),
        "uint8 zero point (uint8 quantized type) is the ONNX Runtime CPU flavour, not TensorRT",
    ),
    "per-channel axis 0": (
        lambda: _weight_scales(_model(), TensorProto.INT8, (K,), axis=0),
        "per-channel axis 0 on a [128, 6] weight; TensorRT expects the output-channel axis 1",
    ),
    "activation vector scale": (
        lambda: _replace(
            _replace(_model(), "x_scale", TensorProto.FLOAT, np.full(K, 0.05, np.float32)),
            "x_zero",
            TensorProto.INT8,
            np.zeros(K, np.int8),
        ),
        "activations are quantized per-tensor",
    ),
    "int4 odd last dimension": (lambda: _model(bits=4, n=5), "odd last dimension 5"),
    "block_size on int8": (
        lambda: _weight_scales(_model(opset=21), TensorProto.INT8, (K // BLOCK, N), axis=0, block_size=BLOCK),
        "block_size on int8 weights",
    ),
    "int4 at opset 17": (lambda: _model(bits=4, opset=17), "opset 17: int4 / block_size needs opset 21"),
    "negative scale": (
        lambda: _replace(_model(), "w_scale", TensorProto.FLOAT, np.full(N, -0.01, np.float32)),
        "finite and strictly positive",
    ),
    "int4 block size 32": (
        lambda: _weight_scales(_model(bits=4), TensorProto.INT4, (K // 32, N), axis=0, block_size=32),
        "int4 block size 32; TensorRT supports 64 or 128",
    ),
    "blocked along two axes": (
        lambda: _weight_scales(_model(bits=4), TensorProto.INT4, (K // BLOCK, 2), axis=0, block_size=BLOCK),
        "expected (2, 6) (blocking along exactly one axis)",
    ),
    "int4 without blocks": (
        lambda: _weight_scales(_model(bits=4), TensorProto.INT4, (N,), axis=1),
        "int4 weights need per-block scales",
    ),
    "weight on MatMul input 0": (
        lambda: _weight_as_first_input(_model()),
        "dequantized weight feeds MatMul input 0, not a MatMul's weight input (1)",
    ),
}


@pytest.mark.parametrize("bits", [8, 4])
def test_clean_graphs_pass(bits):
    assert check_trt_compatible(_model(bits)) == []
    require_trt_compatible(_model(bits))


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_each_broken_graph_is_reported_for_what_breaks_it(case):
    build, expected = BROKEN[case]
    problems = check_trt_compatible(build())
    assert problems, case
    assert all(expected in problem for problem in problems), problems


def test_require_raises_with_every_problem():
    model = _replace(_model(), "x_zero", TensorProto.UINT8, np.array(128, np.uint8))
    expected = r"^2 TensorRT problem\(s\): QuantizeLinear x_q: uint8 .*; DequantizeLinear x_dq: uint8 "
    with pytest.raises(TrtIncompatible, match=expected):
        require_trt_compatible(model)


def _exported(quant: QuantConfig, tmp_path, hidden: int = 64) -> dict[str, onnx.ModelProto]:
    """Both flavours of a tiny BERT student's Q/DQ graph, made by the project's own exporter."""
    teacher = tiny_teacher("bert", hidden=hidden)
    student = build_student(teacher, quant)
    init_ranges(student, quant, random_tokens(32, 24, teacher.backbone.config.vocab_size, seed=0).batches(16))
    contract = build_contract(student)
    float_graph = export_onnx(contract_export_model(teacher, contract), tmp_path / "float.onnx", 17)
    return {flavour: quantize_graph(float_graph, contract, flavour) for flavour in ("trt", "cpu")}


def test_exported_w8a8_trt_flavour_passes_and_cpu_flavour_fails(tmp_path):
    graphs = _exported(QuantConfig(), tmp_path)
    assert check_trt_compatible(graphs["trt"]) == []
    problems = check_trt_compatible(graphs["cpu"])
    assert problems and all("ONNX Runtime CPU flavour, not TensorRT" in p for p in problems)


def test_exported_int4_blocked_by_64_passes(tmp_path):
    quant = QuantConfig(weights=WeightQuant(bits=4, granularity="per-group", group_size=64))
    graphs = _exported(quant, tmp_path, hidden=128)  # every layer at least two groups of 64 wide
    assert check_trt_compatible(graphs["trt"]) == []


def test_exported_int4_groups_of_32_fail_only_on_the_block_size(tmp_path):
    quant = QuantConfig(weights=WeightQuant(bits=4, granularity="per-group", group_size=32))
    problems = check_trt_compatible(_exported(quant, tmp_path)["trt"])
    assert problems and all("int4 block size 32; TensorRT supports 64 or 128" in p for p in problems)
