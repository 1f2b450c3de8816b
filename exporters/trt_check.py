"""Does a Q/DQ ONNX graph follow TensorRT's explicit-quantization rules? A static check, no TensorRT needed.
Where each rule comes from: docs/ARCHITECTURE.md, "TensorRT's rules"."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from calib.capabilities import group_sizes

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INT_TYPES = {TensorProto.INT8: "int8", TensorProto.INT4: "int4"}
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
INT4_BLOCK_SIZES = group_sizes("tensorrt", 4)  # from the capability table
PER_CHANNEL_OPSET = 17
INT4_OPSET = 21


class TrtIncompatible(ValueError):
    """The graph breaks TensorRT's explicit-quantization rules; the message lists every problem."""


@dataclass(frozen=True)
class _Const:
    dtype: int
    values: np.ndarray


def _constants(graph: onnx.GraphProto) -> dict[str, _Const]:
    """Initializers and Constant-node outputs by name."""
    found = {t.name: _Const(t.data_type, numpy_helper.to_array(t)) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                found[node.output[0]] = _Const(value.data_type, numpy_helper.to_array(value))
    return found


def _type_name(dtype: int) -> str:
    return TensorProto.DataType.Name(dtype).lower()


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _quantized_type(node: onnx.NodeProto, consts: dict[str, _Const]) -> int | None:
    """The integer type of the node's quantized side: zero point's, else ONNX's default (None if unknown)."""
    if len(node.input) > 2 and node.input[2] in consts:
        return consts[node.input[2]].dtype
    if node.op_type == "QuantizeLinear":
        return _attr(node, "output_dtype", 0) or TensorProto.UINT8  # ONNX's default without a zero point
    return consts[node.input[0]].dtype if node.input[0] in consts else None


def _check_zero_point(node: onnx.NodeProto, label: str, qtype: int | None, consts: dict[str, _Const]) -> list[str]:
    if qtype == TensorProto.UINT8:
        return [
            f"{label}: uint8 zero point (uint8 quantized type) is the ONNX Runtime CPU flavour, not TensorRT "
            "(TensorRT takes signed int8 with zero point 0)"
        ]
    if qtype is not None and qtype not in INT_TYPES:
        return [f"{label}: quantized type {_type_name(qtype)}; TensorRT's integer Q/DQ takes int8 or int4"]
    if len(node.input) < 3 or not node.input[2]:
        return []
    zero = consts.get(node.input[2])
    if zero is None:
        return [f"{label}: zero point is not a constant (TensorRT needs a build-time constant of zeros)"]
    problems = []
    if np.asarray(zero.values, dtype=np.int64).any():
        problems.append(f"{label}: non-zero zero point (TensorRT quantization is symmetric: zero point 0)")
    scale = consts.get(node.input[1])
    if scale is not None and zero.values.shape != scale.values.shape:
        problems.append(f"{label}: zero point shape {zero.values.shape} differs from scale shape {scale.values.shape}")
    return problems


def _check_scale(label: str, scale: _Const | None) -> list[str]:
    if scale is None:
        return [f"{label}: scale is not a constant (TensorRT needs build-time constant scales)"]
    problems = []
    if scale.dtype not in FLOAT_TYPES:
        problems.append(f"{label}: scale of type {_type_name(scale.dtype)}; TensorRT takes float32/float16/bfloat16")
    values = np.asarray(scale.values, dtype=np.float64)
    if not (np.isfinite(values).all() and (values > 0).all()):
        problems.append(f"{label}: scales must be finite and strictly positive (min {values.min():g})")
    return problems


def _check_weight_granularity(
    node: onnx.NodeProto, label: str, qtype: int | None, shape: tuple[int, ...], scale: np.ndarray
) -> list[str]:
    """Per-channel along the output axis (int8), or blocked along one of the last two axes (int4)."""
    rank = len(shape)
    axis = _attr(node, "axis", 1)
    axis = axis + rank if axis < 0 else axis
    block_size = _attr(node, "block_size", 0)
    if qtype == TensorProto.INT4 and not block_size:
        return [f"{label}: int4 weights need per-block scales (block_size) in TensorRT"]
    if block_size:
        if qtype != TensorProto.INT4:
            return [f"{label}: block_size on {INT_TYPES.get(qtype, 'non-int4')} weights; only int4 weights are blocked"]
        return _check_blocks(label, shape, scale.shape, axis, block_size)
    if scale.ndim == 0:
        return []
    if scale.ndim != 1:
        return [f"{label}: scale of rank {scale.ndim} without block_size (per-channel scales are 1-D)"]
    if axis != rank - 1:
        return [
            f"{label}: per-channel axis {axis} on a {list(shape)} weight; TensorRT expects the output-channel "
            f"axis {rank - 1} of a MatMul's [K, N] weight"
        ]
    if scale.shape[0] != shape[axis]:
        return [f"{label}: {scale.shape[0]} scales for {shape[axis]} channels"]
    return []


def _check_blocks(label: str, shape: tuple[int, ...], scale_shape: tuple[int, ...], axis: int, block: int) -> list[str]:
    problems = []
    if block not in INT4_BLOCK_SIZES:
        supported = " or ".join(map(str, INT4_BLOCK_SIZES))
        problems.append(f"{label}: int4 block size {block}; TensorRT supports {supported}")
    if axis < len(shape) - 2:
        problems.append(f"{label}: blocked along axis {axis}; TensorRT blocks one of the last two dimensions")
    expected = tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))
    if tuple(scale_shape) != expected:
        problems.append(
            f"{label}: scale shape {tuple(scale_shape)} for a {tuple(shape)} weight blocked by {block} along axis "
            f"{axis}; expected {expected} (blocking along exactly one axis)"
        )
    return problems


def _check_weight_use(label: str, output: str, consumers: dict[str, list[tuple[onnx.NodeProto, int]]]) -> list[str]:
    uses = consumers.get(output, [])
    if not uses:
        return [f"{label}: dequantized weight feeds nothing"]
    return [
        f"{label}: dequantized weight feeds {user.op_type} input {index}, not a MatMul's weight input (1)"
        for user, index in uses
        if user.op_type != "MatMul" or index != 1
    ]


def _weight_shapes(graph: onnx.GraphProto, consts: dict[str, _Const]) -> dict[str, tuple[int, ...]]:
    """Shapes of the weight tensors: constants, and QuantizeLinear outputs of constants (float weights)."""
    shapes = {name: const.values.shape for name, const in consts.items()}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in consts:
            shapes[node.output[0]] = consts[node.input[0]].values.shape
    return shapes


def _check_node(
    node: onnx.NodeProto,
    consts: dict[str, _Const],
    weights: dict[str, tuple[int, ...]],
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]],
) -> tuple[list[str], int]:
    """Problems of one Q/DQ node and the opset it needs."""
    label = f"{node.op_type} {node.name or node.output[0]}"
    qtype = _quantized_type(node, consts)
    scale = consts.get(node.input[1])
    problems = _check_zero_point(node, label, qtype, consts) + _check_scale(label, scale)
    shape = weights.get(node.input[0])
    block_size = _attr(node, "block_size", 0)
    needs = INT4_OPSET if qtype == TensorProto.INT4 or block_size else 0
    if shape is None:  # an activation
        if qtype == TensorProto.INT4:
            problems.append(f"{label}: int4 activation; TensorRT supports int4 for weights only")
        if block_size or (scale is not None and scale.values.ndim != 0):
            problems.append(
                f"{label}: activation with block_size or a non-scalar scale; activations are quantized per-tensor"
            )
        return problems, needs
    if scale is not None:
        problems += _check_weight_granularity(node, label, qtype, shape, scale.values)
        needs = max(needs, PER_CHANNEL_OPSET if scale.values.ndim else 0)
    if node.op_type == "DequantizeLinear":
        problems += _check_weight_use(label, node.output[0], consumers)
    return problems, needs


def check_trt_compatible(model: onnx.ModelProto) -> list[str]:
    """Every way ``model``'s Q/DQ layout breaks TensorRT's explicit-quantization rules; empty when none."""
    graph = model.graph
    consts = _constants(graph)
    weights = _weight_shapes(graph, consts)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    problems: list[str] = []
    needed = 0
    for node in graph.node:
        if node.op_type in QDQ_OPS:
            node_problems, needs = _check_node(node, consts, weights, consumers)
            problems += node_problems
            needed = max(needed, needs)
    for name, const in consts.items():
        if const.dtype == TensorProto.INT4 and const.values.ndim and const.values.shape[-1] % 2:
            last = const.values.shape[-1]
            problems.append(f"int4 tensor {name}: odd last dimension {last} (TensorRT packs two to a byte)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < needed:
        reason = "int4 / block_size" if needed == INT4_OPSET else "per-channel Q/DQ"
        problems.append(f"opset {opset}: {reason} needs opset {needed} or later")
    return problems


def require_trt_compatible(model: onnx.ModelProto) -> None:
    """Raise :class:`TrtIncompatible` listing every problem :func:`check_trt_compatible` finds."""
    problems = check_trt_compatible(model)
    if problems:
        raise TrtIncompatible(f"{len(problems)} TensorRT problem(s): " + "; ".join(problems))
