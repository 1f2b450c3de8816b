"""Rewrite a float ONNX graph into a Q/DQ graph in one of the export flavours (registered here, in
:data:`FLAVOURS`), reading every number from the export contract: nothing here re-derives a number. The
layouts and why: docs/ARCHITECTURE.md."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from calib.capabilities import Scheme, unsupported
from calib.contract import Contract, LayerSpec
from calib.rotation import online_rotations
from exporters.cpu_kernels import Int8WeightType, cpu_int8_weight_type
from exporters.decoding import past_name, present_name
from exporters.onnx_export import weight_initializer_name
from exporters.trt_check import check_trt_compatible

INT4_OPSET = 21
DYNAMIC_ACCURACY_LEVEL = 4  # MatMulNBits: int8 compute, its input quantized per block at run time


@dataclass(frozen=True)
class Flavour:
    """One layout of the same quantized function: the runtime it is laid out for (``--export`` of it checks the
    capability table; its ``lint`` checks its rules), the activations' zero point (its dtype is theirs), whether
    layers become ONNX Runtime's fused contrib kernels, whether validation runs Q/DQ by their ONNX definition."""

    name: str
    runtime: str
    activation_zero_point: np.ndarray
    fused_kernels: bool
    reference_qdq: bool
    lint: Callable[[onnx.ModelProto], list[str]] | None = None


FLAVOURS: dict[str, Flavour] = {
    "trt": Flavour("trt", "tensorrt", np.array(0, np.int8), False, True, check_trt_compatible),
    "cpu": Flavour("cpu", "onnxruntime", np.array(128, np.uint8), True, False),
}


class ExportUnsupported(ValueError):
    """ONNX Runtime, which executes every graph written here, does not run the contract's scheme (2-bit), or a
    flavour cannot express it (per-block activations in the TensorRT flavour)."""


def check_exportable(contract: Contract) -> None:
    """Raise :class:`ExportUnsupported` naming the first layer whose scheme ONNX Runtime does not execute.

    Both flavours are graphs ONNX Runtime runs (the CPU flavour on its kernels, the TensorRT flavour by the
    ONNX definition of Q/DQ); whether TensorRT builds the latter is its lint's and the config check's business."""
    online = online_rotations(contract.rotation)
    for spec in contract.layers:
        if spec.name in online and f"{spec.name}.input_multiplier" in contract.tensors:
            # the graph's Mul would land after the online Hadamard, the student's goes before it
            raise ExportUnsupported(f"{spec.name}: an unfolded Quadapter before an online rotation is not exported")
        scheme = Scheme(
            spec.weight_bits, spec.granularity, spec.group_size, spec.act_bits, spec.act_granularity, spec.zero_point
        )
        problem = unsupported("onnxruntime", scheme)
        if problem is not None:
            key, expected, got = problem
            raise ExportUnsupported(
                f"{spec.weight_bits}-bit weights ({spec.name}): quant.{key} must be {expected}, got {got!r}; "
                "the student is PyTorch-only"
            )


def flavour_unsupported(contract: Contract, flavour: Flavour) -> str | None:
    """Why ``flavour`` cannot lay out the contract, or None: per-block (dynamic) activations exist only as ONNX
    Runtime's MatMulNBits int8 compute, which the TensorRT flavour (static per-tensor Q/DQ) cannot express, and
    asymmetric weights only as MatMulNBits' zero points (TensorRT's quantization is symmetric)."""
    if flavour.fused_kernels:
        return None
    two_bit = next((spec for spec in contract.layers if spec.weight_bits == 2), None)
    if two_bit is not None:
        return f"2-bit weights ({two_bit.name}) run only as ONNX Runtime's MatMulNBits; TensorRT has no 2-bit weights"
    dynamic = next((spec for spec in contract.layers if spec.act_block), None)
    if dynamic is not None:
        return (
            f"per-block dynamic activations ({dynamic.name}) are ONNX Runtime's MatMulNBits int8 compute; "
            f"the {flavour.name} flavour's int8 activations are static per tensor"
        )
    asymmetric = next((spec for spec in contract.layers if spec.zero_point), None)
    if asymmetric is not None:
        return (
            f"asymmetric weights ({asymmetric.name}: quant.weights.zero_point) are ONNX Runtime's MatMulNBits zero "
            f"points; the {flavour.name} flavour is symmetric (zero point 0)"
        )
    return None


def required_opset(contract: Contract) -> int:
    """Opset 21 where int4 appears (INT4 tensors, blocked DequantizeLinear), else 17."""
    return INT4_OPSET if any(spec.weight_bits == 4 for spec in contract.layers) else 17


def _weight_dq(spec: LayerSpec, contract: Contract) -> tuple[list[TensorProto], onnx.NodeProto, str]:
    """Initializers and the DequantizeLinear node producing the layer's float ``[in, out]`` weight."""
    base = f"{spec.name}.weight"
    q = contract.tensors[f"{spec.name}.weight_int"].numpy().T.copy()  # [in, out]
    scale = contract.tensors[f"{spec.name}.weight_scale"].numpy().astype(np.float32)
    dtype = TensorProto.INT8 if spec.weight_bits == 8 else TensorProto.INT4
    attrs: dict[str, int] = {}
    if spec.group_size:
        scale = scale.T.copy()  # [out, in/g] -> [in/g, out]: blocks run along the input axis (0)
        attrs = {"axis": 0, "block_size": spec.group_size}
    else:
        attrs = {"axis": 1}  # one scale per output channel = per column of the [in, out] weight
    zero = np.zeros(scale.shape, dtype=np.int8)
    inits = [
        helper.make_tensor(f"{base}_quantized", dtype, q.shape, q.astype(np.int8).flatten().tolist())
        if dtype == TensorProto.INT4
        else numpy_helper.from_array(q.astype(np.int8), f"{base}_quantized"),
        numpy_helper.from_array(scale, f"{base}_scale"),
        helper.make_tensor(f"{base}_zero_point", dtype, zero.shape, zero.flatten().tolist())
        if dtype == TensorProto.INT4
        else numpy_helper.from_array(zero, f"{base}_zero_point"),
    ]
    out = f"{base}_dequantized"
    node = helper.make_node(
        "DequantizeLinear",
        [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
        [out],
        name=f"{base}_DequantizeLinear",
        **attrs,
    )
    return inits, node, out


@dataclass(frozen=True)
class QuantizedInput:
    """One activation quantizer in the graph: its QuantizeLinear output, scale and zero point."""

    quantized: str
    scale: str
    zero_point: str


def _activation_quantize(
    base: str, scale_value: np.ndarray, source: str, flavour: Flavour
) -> tuple[list[TensorProto], onnx.NodeProto, QuantizedInput]:
    """QuantizeLinear of ``source`` with a contract scale and the flavour's zero point."""
    scale = scale_value.astype(np.float32).reshape(())
    zero = flavour.activation_zero_point
    inits = [numpy_helper.from_array(scale, f"{base}_scale"), numpy_helper.from_array(zero, f"{base}_zero_point")]
    q = QuantizedInput(f"{base}_quantized", f"{base}_scale", f"{base}_zero_point")
    node = helper.make_node(
        "QuantizeLinear", [source, q.scale, q.zero_point], [q.quantized], name=f"{base}_QuantizeLinear"
    )
    return inits, node, q


def _activation_dequantize(q: QuantizedInput) -> tuple[onnx.NodeProto, str]:
    """The DequantizeLinear that pairs with an activation's QuantizeLinear."""
    out = q.quantized.replace("_quantized", "_dequantized")
    node = helper.make_node(
        "DequantizeLinear",
        [q.quantized, q.scale, q.zero_point],
        [out],
        name=out.replace("_dequantized", "_DequantizeLinear"),
    )
    return node, out


def _attention_matmul_pairs(
    graph: onnx.GraphProto, modules: list[str], constants: set[str]
) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """The (QK^T, AV) MatMuls of each attention module, in graph order (the exporter keeps module order).

    They are the MatMuls with no constant input; AV is the one whose first input comes from Softmax."""
    producers = {out: node for node in graph.node for out in node.output}
    dynamic = [n for n in graph.node if n.op_type == "MatMul" and not constants.intersection(n.input)]
    if len(dynamic) != 2 * len(modules):
        raise ValueError(f"expected {2 * len(modules)} attention MatMuls in the float graph, found {len(dynamic)}")
    pairs = list(zip(dynamic[0::2], dynamic[1::2]))
    for _, av in pairs:
        source = producers.get(av.input[0])
        while source is not None and source.op_type in ("Cast", "Dropout", "Identity"):
            source = producers.get(source.input[0])
        if source is None or source.op_type != "Softmax":
            raise ValueError(f"attention MatMul {av.name} does not read a Softmax output")
    return pairs


def _quantize_attention(
    graph: onnx.GraphProto, contract: Contract, flavour: Flavour, constants: set[str]
) -> tuple[list[TensorProto], dict[str, list[onnx.NodeProto]]]:
    """Q/DQ on the four attention matmul inputs of every module in ``contract.attention``."""
    inits: list[TensorProto] = []
    before: dict[str, list[onnx.NodeProto]] = {}
    for module, (qk, av) in zip(contract.attention, _attention_matmul_pairs(graph, contract.attention, constants)):
        for matmul, roles in ((qk, ("query", "key")), (av, ("probs", "value"))):
            nodes = []
            for index, role in enumerate(roles):
                scale = contract.tensors[f"{module}.{role}_scale"].numpy()
                q_inits, q_node, q = _activation_quantize(f"{module}.{role}", scale, matmul.input[index], flavour)
                dq_node, matmul.input[index] = _activation_dequantize(q)
                inits += q_inits
                nodes += [q_node, dq_node]
            before[matmul.name] = nodes
    return inits, before


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Initializer names, and outputs of Identity / Transpose nodes on them (de-duplicated or tied weights)."""
    names = {init.name for init in graph.initializer}
    return names | {n.output[0] for n in graph.node if n.op_type in ("Identity", "Transpose") and n.input[0] in names}


def _bias_add(
    consumers: dict[str, list[onnx.NodeProto]], matmul: onnx.NodeProto, constants: set[str]
) -> onnx.NodeProto | None:
    """The Add that puts a constant bias on the MatMul's output, when it is the output's only consumer."""
    users = consumers.get(matmul.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
    return add if other in constants else None


def _matmul_integer_to_float(
    spec: LayerSpec,
    contract: Contract,
    q: QuantizedInput,
    matmul: onnx.NodeProto,
    add: onnx.NodeProto | None,
    int8_weights: Int8WeightType,
) -> tuple[list[TensorProto], onnx.NodeProto]:
    """ORT's MatMulIntegerToFloat for an int8 layer (CPU flavour): uint8 activations times int8 weights, scaled to
    float, with the bias added in the same kernel (ORT's own QDQ fusion leaves a separate Add: 6-10% slower on
    MiniLM). ``int8_weights="uint8"`` stores 8-bit weights shifted by 128 with zero point 128, the same integers
    (:mod:`exporters.cpu_kernels`); 4-bit integers stay int8: their products cannot saturate."""
    base = f"{spec.name}.weight"
    weight = contract.tensors[f"{spec.name}.weight_int"].numpy().T.astype(np.int8)  # [in, out]
    scale = contract.tensors[f"{spec.name}.weight_scale"].numpy().astype(np.float32).reshape(-1)
    weight_zero = ""
    if int8_weights == "uint8" and spec.weight_bits == 8:
        weight = (weight.astype(np.int16) + 128).astype(np.uint8)
        weight_zero = f"{base}_zero_point"
    inits = [numpy_helper.from_array(weight, f"{base}_quantized"), numpy_helper.from_array(scale, f"{base}_scale")]
    if weight_zero:
        inits.append(numpy_helper.from_array(np.full(weight.shape[1], 128, dtype=np.uint8), weight_zero))
    bias = ""
    if add is not None:
        bias = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
    node = helper.make_node(
        "MatMulIntegerToFloat",
        [q.quantized, f"{base}_quantized", q.scale, f"{base}_scale", q.zero_point, weight_zero, bias],
        [add.output[0] if add is not None else matmul.output[0]],
        name=f"{spec.name}.MatMulIntegerToFloat",
        domain="com.microsoft",
    )
    return inits, node


def _rewrite_embedding(model: onnx.ModelProto, contract: Contract, name: str) -> None:
    """Swap the float initializer of embedding table ``name`` for the contract's int8 rows, gathered before they
    are dequantized (a DequantizeLinear of the whole table would run at every inference: 5.8 ms for MiniLM's).

    Both flavours: a Gather of the int8 rows, a per-tensor DequantizeLinear of scale 1 (an int8 activation as
    TensorRT's rules take it), times the gathered rows' scales (stored as float16: the student's steps are
    float16 values, :func:`calib.quant_linear.float16_step`): the student's products. ORT's
    GatherBlockQuantized would do it in one kernel, but its scales come per block of at most 128 columns and
    with zero points, which makes MiniLM's file 0.4 MB larger than per-row scales; the gather is no hot path.
    """
    graph = model.graph
    table_name = f"backbone.{name}.weight"
    initializer = next((i for i in graph.initializer if i.name == table_name), None)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == table_name]
    if initializer is None or len(gathers) != 1:
        raise ValueError(f"expected one Gather on initializer {table_name} in the float graph")
    graph.initializer.remove(initializer)
    gather = gathers[0]
    q = contract.tensors[f"{name}.weight_int"].numpy()
    scale = contract.tensors[f"{name}.weight_scale"].numpy().astype(np.float32)
    data, scale_name, zero_name = f"{name}.weight_quantized", f"{name}.weight_scale", f"{name}.weight_zero_point"
    graph.initializer.extend(
        [
            numpy_helper.from_array(q, data),
            numpy_helper.from_array(scale[:, None].astype(np.float16), scale_name),  # exact: float16 steps
            numpy_helper.from_array(np.array(1.0, np.float32), f"{name}.unit_scale"),
            numpy_helper.from_array(np.array(0, np.int8), zero_name),
        ]
    )
    ids, out = gather.input[1], gather.output[0]
    nodes = [
        helper.make_node("Gather", [data, ids], [f"{name}.rows_int8"], name=f"{name}.GatherRows"),
        helper.make_node(
            "DequantizeLinear",
            [f"{name}.rows_int8", f"{name}.unit_scale", zero_name],
            [f"{name}.rows_integers"],
            name=f"{name}.rows_DequantizeLinear",
        ),
        helper.make_node("Gather", [scale_name, ids], [f"{name}.rows_scale16"], name=f"{name}.GatherScales"),
        helper.make_node(
            "Cast", [f"{name}.rows_scale16"], [f"{name}.rows_scale"], name=f"{name}.ScalesCast", to=TensorProto.FLOAT
        ),
        helper.make_node("Mul", [f"{name}.rows_integers", f"{name}.rows_scale"], [out], name=f"{name}.RowsMul"),
    ]
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)


def _use_ms_domain(model: onnx.ModelProto) -> None:
    """Declare ONNX Runtime's contrib-op domain (MatMulNBits, MatMulIntegerToFloat)."""
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _pack_low_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-wide integers packed along the last axis, the first in the lowest bits of each byte
    (MatMulNBits' layout), the axis padded with zeros to whole bytes; 8-bit ones unchanged."""
    per_byte = 8 // bits
    values = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, -values.shape[-1] % per_byte)])
    packed = np.zeros((*values.shape[:-1], values.shape[-1] // per_byte), np.uint8)
    for slot in range(per_byte):
        packed |= (values[..., slot::per_byte] << (bits * slot)).astype(np.uint8)
    return packed


def _matmul_nbits(
    spec: LayerSpec, contract: Contract, matmul: onnx.NodeProto, accuracy_level: int
) -> tuple[list[TensorProto], onnx.NodeProto]:
    """ORT's MatMulNBits for a layer (CPU flavour): the contract's integers as unsigned (q + 2^(bits-1), the
    default zero point when none is given, or the contract's zero points shifted alike; 4-bit ones two per
    byte, 2-bit ones four) in blocks of the weights' group or, for per-channel weights under per-block
    activations, of the activations' block, each channel's scale repeated per block (the same numbers). With
    accuracy_level 4 the kernel quantizes its input in those blocks."""
    bits = spec.weight_bits
    q = contract.tensors[f"{spec.name}.weight_int"].numpy().astype(np.int16) + (1 << (bits - 1))  # [N, K]
    n, k = spec.out_features, spec.in_features
    block = spec.group_size or spec.act_block
    packed = _pack_low_bits(q.reshape(n, k // block, block).astype(np.uint8), bits)  # [N, K/block, bytes]
    scale = contract.tensors[f"{spec.name}.weight_scale"].numpy().astype(np.float32)
    scale = (scale if spec.group_size else np.repeat(scale[:, None], k // block, axis=1)).reshape(-1)
    base = f"{spec.name}.weight"
    inits = [numpy_helper.from_array(packed, f"{base}_packed"), numpy_helper.from_array(scale, f"{base}_scale")]
    inputs = [matmul.input[0], f"{base}_packed", f"{base}_scale"]
    if spec.zero_point:  # per block, unsigned like the integers, packed alike along each (padded) row
        zero = contract.tensors[f"{spec.name}.weight_zero_point"].numpy().astype(np.int16) + (1 << (bits - 1))
        inits.append(numpy_helper.from_array(_pack_low_bits(zero.astype(np.uint8), bits).reshape(-1),
                                             f"{base}_zero_points"))  # fmt: skip
        inputs.append(f"{base}_zero_points")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        list(matmul.output),
        name=f"{spec.name}.MatMulNBits",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=accuracy_level,
    )
    return inits, node


def _pass_through_source(producers: dict[str, onnx.NodeProto], name: str) -> str:
    """The tensor ``name`` copies through single-input Concat / Identity nodes (the tracer's copy of the past)."""
    node = producers.get(name)
    while node is not None and node.op_type in ("Concat", "Identity") and len(node.input) == 1:
        name = node.input[0]
        node = producers.get(name)
    return name


def _quantize_kv_cache(model: onnx.ModelProto, contract: Contract) -> None:
    """An int8 cache, one scale per key/value head: each layer's past input and present output become int8, the
    new keys / values are quantized before the Concat that appends them, and one DequantizeLinear after it feeds
    attention (the student fake-quantizes the whole cache at every call: the same numbers). Both flavours."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    types = {v.name: v for v in list(graph.input) + list(graph.output)}
    inserted: dict[str, list[onnx.NodeProto]] = {}
    for layer, module in enumerate(contract.kv_cache):
        for role in ("key", "value"):
            past, present = past_name(layer, role), present_name(layer, role)
            concat = producers.get(present)
            if concat is None or concat.op_type != "Concat" or _pass_through_source(producers, concat.input[0]) != past:
                raise ValueError(f"expected {present} to be a Concat of {past} and the new {role}s")
            base = f"{module}.{role}_cache"
            scale = contract.tensors[f"{base}_scale"].numpy().astype(np.float32)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(scale, f"{base}_scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zero_point"),
                ]
            )
            qdq = [f"{base}_scale", f"{base}_zero_point"]
            new, dequantized = concat.input[1], f"{present}_dequantized"
            for node in graph.node:  # attention reads the dequantized cache; the graph returns the int8 one
                node.input[:] = [dequantized if name == present else name for name in node.input]
            concat.input[1] = f"{base}_new_quantized"
            inserted[concat.name] = [
                helper.make_node("QuantizeLinear", [new, *qdq], [concat.input[1]], name=f"{base}_Q", axis=1)
            ]
            inserted[f"{concat.name}/after"] = [
                helper.make_node("DequantizeLinear", [present, *qdq], [dequantized], name=f"{base}_DQ", axis=1)
            ]
            types[past].type.tensor_type.elem_type = TensorProto.INT8
            types[present].type.tensor_type.elem_type = TensorProto.INT8
    ordered = []
    for node in graph.node:
        ordered += inserted.get(node.name, [])
        ordered.append(node)
        ordered += inserted.get(f"{node.name}/after", [])
    del graph.node[:]
    graph.node.extend(ordered)


def quantize_graph(
    float_model: onnx.ModelProto,
    contract: Contract,
    flavour: Flavour | str,
    int4_accuracy_level: int = 0,
    cpu_int8_weights: str = "auto",
) -> onnx.ModelProto:
    """A copy of ``float_model`` with Q/DQ for every contract layer (weights, and inputs when A8).

    With fused kernels (the CPU flavour) grouped int4 / int2 weights become MatMulNBits (``int4_accuracy_level``
    sets its compute mode) and 8-bit weights are stored as ``cpu_int8_weights`` (``auto``: what is exact on
    this machine, :func:`cpu_int8_weight_type`). Quantized embedding tables are gathered as int8 rows."""
    flavour = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
    check_exportable(contract)
    problem = flavour_unsupported(contract, flavour)
    if problem is not None:
        raise ExportUnsupported(problem)
    int8_weights = cpu_int8_weight_type(cpu_int8_weights)
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    opset = required_opset(contract)
    if opset > model.opset_import[0].version:
        model = version_converter.convert_version(model, opset)
    graph = model.graph
    matmul_by_weight = {node.input[1]: node for node in graph.node if node.op_type == "MatMul"}
    initializers = {init.name: init for init in graph.initializer}
    new_inits: list[TensorProto] = []
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    replaced: dict[str, onnx.NodeProto | None] = {}  # node name -> the node taking its place (None: removed)
    multiplied: dict[tuple[str, bytes], str] = {}  # (source, multiplier bytes) -> Mul output: one Mul per group
    quantized: dict[tuple[str, bytes], QuantizedInput] = {}  # (source, scale bytes): layers sharing an input share it
    dequantized: dict[str, str] = {}  # QuantizeLinear output -> its DequantizeLinear output
    constants = _constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    if contract.attention:
        new_inits, new_nodes = _quantize_attention(graph, contract, flavour, constants)
    for spec in contract.layers:
        weight_name = weight_initializer_name(spec.name)
        matmul = matmul_by_weight.get(weight_name)
        if matmul is None or weight_name not in initializers:
            raise ValueError(f"no MatMul on initializer {weight_name} in the float graph")
        graph.initializer.remove(initializers[weight_name])
        before = []
        multiplier = contract.tensors.get(f"{spec.name}.input_multiplier")
        if multiplier is not None:
            key = (matmul.input[0], multiplier.numpy().tobytes())
            if key not in multiplied:
                name = f"{spec.name}.input_multiplier"
                new_inits.append(numpy_helper.from_array(multiplier.numpy().astype(np.float32), name))
                before.append(helper.make_node("Mul", [matmul.input[0], name], [f"{name}_out"], name=f"{name}_Mul"))
                multiplied[key] = f"{name}_out"
            matmul.input[0] = multiplied[key]
        if spec.act_block:  # the kernel quantizes its own input, per block (flavour_unsupported: CPU only)
            inits, replaced[matmul.name] = _matmul_nbits(spec, contract, matmul, DYNAMIC_ACCURACY_LEVEL)
            new_inits += inits
            new_nodes[matmul.name] = before
            continue
        q = None
        if spec.act_bits == 8:
            scale = contract.tensors[f"{spec.name}.input_scale"].numpy()
            key = (matmul.input[0], scale.tobytes())
            if key not in quantized:
                a_inits, a_node, quantized[key] = _activation_quantize(
                    f"{spec.name}.input", scale, matmul.input[0], flavour
                )
                new_inits += a_inits
                before.append(a_node)
            q = quantized[key]
        # int4 per channel with int8 inputs runs on the same int8 kernel: its integers fit int8 unchanged
        # (twice the weight bytes of int4 storage, ~5x faster than a DequantizeLinear to float on the CPU)
        if flavour.fused_kernels and not spec.group_size and q is not None:
            add = _bias_add(consumers, matmul, constants)
            inits, replaced[matmul.name] = _matmul_integer_to_float(spec, contract, q, matmul, add, int8_weights)
            new_inits += inits
            if add is not None:
                replaced[add.name] = None
        else:
            if q is not None:
                if q.quantized not in dequantized:
                    dq_node, dequantized[q.quantized] = _activation_dequantize(q)
                    before.append(dq_node)
                matmul.input[0] = dequantized[q.quantized]
            if flavour.fused_kernels and spec.group_size:
                inits, replaced[matmul.name] = _matmul_nbits(spec, contract, matmul, int4_accuracy_level)
                new_inits += inits
            else:
                inits, dq, weight_out = _weight_dq(spec, contract)
                new_inits += inits
                before.append(dq)
                matmul.input[1] = weight_out
        new_nodes[matmul.name] = before
    ordered = []
    for node in graph.node:
        ordered += new_nodes.get(node.name, [])
        substitute = replaced.get(node.name, node)
        if substitute is not None:
            ordered.append(substitute)
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_inits)
    if any(node.domain == "com.microsoft" for node in graph.node):
        _use_ms_domain(model)
    for name in contract.embeddings:
        _rewrite_embedding(model, contract, name)
    if contract.kv_cache:
        _quantize_kv_cache(model, contract)
    onnx.checker.check_model(model, full_check=True)
    return model
