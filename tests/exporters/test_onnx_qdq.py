"""The Q/DQ graphs compute the student's quantized function, with the contract's numbers, in both flavours."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from calib.config import ActivationQuant, QuadapterConfig, QuantConfig, WeightQuant
from calib.contract import build_contract, load_student
from calib.inputs import random_tokens
from calib.quant_linear import QuantLinear
from calib.student import build_student, init_ranges
from exporters.cpu_kernels import ort_session, u8s8_products_exact
from exporters.decoding import run_full_sequence
from exporters.onnx_export import contract_export_model, export_onnx, teacher_export_model
from exporters.onnx_qdq import ExportUnsupported, quantize_graph
from exporters.trt_check import check_trt_compatible
from tests.models import student_and_graphs, tiny_teacher

W8A8 = QuantConfig()
W4A8 = QuantConfig(weights=WeightQuant(bits=4))  # int4 per channel
W4A8_G32 = QuantConfig(weights=WeightQuant(bits=4, granularity="per-group", group_size=32))
W4A16_G32 = QuantConfig(
    weights=WeightQuant(bits=4, granularity="per-group", group_size=32), activations=ActivationQuant(bits=16)
)
W8A8_QUADAPTER = QuantConfig(quadapter=QuadapterConfig(enabled=True, positions="all"))
W8A8_ATTENTION = QuantConfig(attention_matmuls=True)
W8A8_LM_HEAD = QuantConfig(lm_head=True)
W4A8_G32_EMB8 = QuantConfig(weights=WeightQuant(bits=4, granularity="per-group", group_size=32), embedding_bits=8)
PER_BLOCK = ActivationQuant(granularity="per-block")  # dynamic int8 in the weights' groups
W4A8_G32_DYNAMIC = QuantConfig(
    weights=WeightQuant(bits=4, granularity="per-group", group_size=32), activations=PER_BLOCK
)
W8A8_DYNAMIC = QuantConfig(activations=ActivationQuant(granularity="per-block", block_size=32))
W4A8_DYNAMIC = QuantConfig(
    weights=WeightQuant(bits=4), activations=ActivationQuant(granularity="per-block", block_size=16)
)
ASYMMETRIC_G32 = WeightQuant(bits=4, granularity="per-group", group_size=32, zero_point=True, init="mse")
W4A16_G32_ZP = QuantConfig(weights=ASYMMETRIC_G32, activations=ActivationQuant(bits=16))
W4A8_G32_ZP_DYNAMIC = QuantConfig(weights=ASYMMETRIC_G32, activations=PER_BLOCK)
W2A16_G32 = QuantConfig(
    weights=WeightQuant(bits=2, granularity="per-group", group_size=32), activations=ActivationQuant(bits=16)
)
W2A16_G32_ZP = QuantConfig(
    weights=WeightQuant(bits=2, granularity="per-group", group_size=32, zero_point=True),
    activations=ActivationQuant(bits=16),
)
W2A8_DYNAMIC = QuantConfig(
    weights=WeightQuant(bits=2), activations=ActivationQuant(granularity="per-block", block_size=32)
)
# Stated bound: outputs of the exported graphs and of the PyTorch student agree to a cosine of 0.9999
# and a max |diff| of 2% of the output's range (float op order can move a value across a rounding edge).
MIN_COSINE, MAX_REL_DIFF = 0.9999, 0.02


def min_row_cosine(got: np.ndarray, expected: np.ndarray) -> float:
    """The smallest cosine between matching rows (last axis) of two outputs of one size."""
    got, ref = got.reshape(-1, expected.shape[-1]), expected.reshape(-1, expected.shape[-1])
    return float(((got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))).min())


def _run(graph, ids, mask, reference_qdq=False):
    session = ort_session(graph.SerializeToString(), reference_qdq=reference_qdq)
    return run_full_sequence(session, ids, mask)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2"])
@pytest.mark.parametrize(
    "quant",
    [W8A8, W4A8, W4A8_G32, W4A16_G32, W8A8_QUADAPTER, W4A8_G32_EMB8, W8A8_ATTENTION, W8A8_LM_HEAD,
     W4A8_G32_DYNAMIC, W8A8_DYNAMIC, W4A8_DYNAMIC, W4A16_G32_ZP, W4A8_G32_ZP_DYNAMIC, W2A16_G32, W2A16_G32_ZP,
     W2A8_DYNAMIC],
    ids=["W8A8", "W4A8", "W4A8g32", "W4A16g32", "W8A8quadapter", "W4A8g32emb8", "W8A8attention", "W8A8lmhead",
         "W4A8g32dynamic", "W8A8dynamic", "W4A8dynamic", "W4A16g32zp", "W4A8g32zpdynamic", "W2A16g32", "W2A16g32zp",
         "W2A8dynamic"],
)  # fmt: skip
def test_both_flavours_match_the_pytorch_student(family, quant, tmp_path):
    teacher, student, contract, graphs = student_and_graphs(family, quant, tmp_path)
    tokens = random_tokens(8, 20, teacher.backbone.config.vocab_size, seed=7)
    ids, mask = tokens.input_ids.numpy(), tokens.attention_mask.numpy()
    with torch.no_grad():
        expected = student(tokens.input_ids, tokens.attention_mask).numpy()
        rebuilt = load_student(teacher, quant, contract)(tokens.input_ids, tokens.attention_mask).numpy()
    np.testing.assert_array_equal(rebuilt, expected)  # the contract holds the student exactly
    span = expected.max() - expected.min()
    for flavour, graph in graphs.items():
        # the TensorRT flavour by the Q/DQ definition (as TensorRT computes), the CPU flavour on ORT's int8 kernels
        got = _run(graph, ids, mask, reference_qdq=flavour == "trt").reshape(-1, expected.shape[-1])
        ref = expected.reshape(-1, expected.shape[-1])
        cosine = min_row_cosine(got, ref)
        assert cosine > MIN_COSINE, (flavour, cosine)
        assert np.abs(got - ref).max() <= MAX_REL_DIFF * span, (flavour, np.abs(got - ref).max(), span)


def test_one_group_per_row_keeps_its_group_axis(tmp_path):
    """Group size equal to the layer width (hidden 64, groups of 64) is a valid per-group layout."""
    teacher = tiny_teacher("gpt2")  # hidden 64, MLP 128: the attention layers have one group per row
    quant = QuantConfig(weights=WeightQuant(bits=4, granularity="per-group", group_size=64))
    student = build_student(teacher, quant)
    init_ranges(student, quant, random_tokens(8, 16, 512, seed=0).batches(8))
    contract = build_contract(student)
    tokens = random_tokens(2, 12, 512, seed=1)
    with torch.no_grad():
        expected = student(tokens.input_ids, tokens.attention_mask)
        rebuilt = load_student(teacher, quant, contract)(tokens.input_ids, tokens.attention_mask)
    assert torch.equal(expected, rebuilt)


def test_trt_flavour_layout(tmp_path):
    _, _, contract, graphs = student_and_graphs("bert", W8A8, tmp_path)
    graph = graphs["trt"]
    inits = {i.name: i for i in graph.graph.initializer}
    spec = contract.layers[0]
    weight = numpy_helper.to_array(inits[f"{spec.name}.weight_quantized"])
    np.testing.assert_array_equal(weight, contract.tensors[f"{spec.name}.weight_int"].numpy().T)
    np.testing.assert_array_equal(
        numpy_helper.to_array(inits[f"{spec.name}.weight_scale"]), contract.tensors[f"{spec.name}.weight_scale"].numpy()
    )
    for node in graph.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = inits[node.input[2]]
            assert zero.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero).any()
        if node.op_type == "DequantizeLinear" and node.name.endswith("weight_DequantizeLinear"):
            assert {a.name: a.i for a in node.attribute} == {"axis": 1}
    cpu_zero_points = [i for i in graphs["cpu"].graph.initializer if i.name.endswith("input_zero_point")]
    assert cpu_zero_points and all(
        i.data_type == TensorProto.UINT8 and numpy_helper.to_array(i) == 128 for i in cpu_zero_points
    )


def test_int4_groups_use_opset_21_blocked_dequantize(tmp_path):
    _, _, contract, graphs = student_and_graphs("bert", W4A8_G32, tmp_path)
    graph = graphs["trt"]
    assert graph.opset_import[0].version == 21
    weight_dq = [n for n in graph.graph.node if n.name.endswith("weight_DequantizeLinear")]
    assert len(weight_dq) == len(contract.layers)
    for node in weight_dq:
        assert {a.name: a.i for a in node.attribute} == {"axis": 0, "block_size": 32}
    int4 = [i for i in graph.graph.initializer if i.data_type == TensorProto.INT4]
    assert len(int4) == 2 * len(contract.layers)  # weights and their zero points


def test_cpu_flavour_uses_ort_contrib_ops_for_int4(tmp_path):
    _, _, contract, graphs = student_and_graphs("bert", W4A8_G32_EMB8, tmp_path)
    ops = [n.op_type for n in graphs["cpu"].graph.node]
    assert ops.count("MatMulNBits") == len(contract.layers)
    trt_ops = [n.op_type for n in graphs["trt"].graph.node]
    assert "MatMulNBits" not in trt_ops
    size = {flavour: len(graph.SerializeToString()) for flavour, graph in graphs.items()}
    assert abs(size["cpu"] - size["trt"]) / size["trt"] < 0.1  # the same int4 / int8 storage either way


@pytest.mark.parametrize("quant", [W8A8, W4A8], ids=["W8A8", "W4A8 per channel"])
def test_cpu_flavour_runs_int8_inputs_as_one_integer_kernel_with_the_bias(quant, tmp_path):
    _, _, contract, graphs = student_and_graphs("bert", quant, tmp_path)
    nodes = graphs["cpu"].graph.node
    fused = [n for n in nodes if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == len(contract.layers)
    assert all(n.input[6] for n in fused)  # every bias Add went into the kernel
    adds = {flavour: sum(n.op_type == "Add" for n in graph.graph.node) for flavour, graph in graphs.items()}
    assert adds["trt"] - adds["cpu"] == len(contract.layers)
    dequantized = [n.name for n in nodes if n.op_type == "DequantizeLinear"]
    assert all(name.endswith(".rows_DequantizeLinear") for name in dequantized)  # only gathered table rows
    shared = {n.input[0] for n in fused}  # Q, K and V read one QuantizeLinear
    assert len(shared) == sum(n.op_type == "QuantizeLinear" for n in nodes) == len(contract.layers) - 2 * 2


def test_two_bit_weights_with_static_per_channel_activations_are_refused_with_a_reason(tmp_path):
    """ONNX Runtime runs 2-bit weights only as MatMulNBits: per group, or per channel under per-block inputs."""
    teacher = tiny_teacher("bert")
    quant = QuantConfig(weights=WeightQuant(bits=2))
    student = build_student(teacher, quant)
    init_ranges(student, quant, random_tokens(8, 16, 512, seed=0).batches(8))
    contract = build_contract(student)
    float_graph = export_onnx(contract_export_model(teacher, contract), tmp_path / "f.onnx", 17)
    with pytest.raises(ExportUnsupported, match="2-bit weights .* must be per-block .* PyTorch-only"):
        quantize_graph(float_graph, contract, "cpu")


def test_teacher_export_matches_pytorch(tmp_path):
    teacher = tiny_teacher("gpt2")
    graph = export_onnx(teacher_export_model(teacher), tmp_path / "t.onnx", 17)
    onnx.checker.check_model(graph)
    tokens = random_tokens(4, 16, 512, seed=3)
    with torch.no_grad():
        expected = teacher(tokens.input_ids, tokens.attention_mask).numpy()
    got = _run(graph, tokens.input_ids.numpy(), tokens.attention_mask.numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cpu_int8_weight_layouts_are_the_same_integers(family, tmp_path):
    """uint8 weights (zero point 128) hold the int8 integers shifted; on this CPU the layout ``auto`` picks is
    the student's function, and the other one too wherever uint8 x int8 products cannot saturate."""
    teacher, student, contract, _ = student_and_graphs(family, W8A8, tmp_path)
    float_graph = export_onnx(contract_export_model(teacher, contract), tmp_path / "f.onnx", 17)
    layouts = {w: quantize_graph(float_graph, contract, "cpu", cpu_int8_weights=w) for w in ("int8", "uint8")}
    inits = {w: {i.name: numpy_helper.to_array(i) for i in g.graph.initializer} for w, g in layouts.items()}
    name = next(n for n, a in inits["int8"].items() if n.endswith(".weight_quantized") and a.dtype == np.int8)
    assert inits["uint8"][name].dtype == np.uint8
    np.testing.assert_array_equal(inits["uint8"][name].astype(np.int16) - 128, inits["int8"][name])
    assert (inits["uint8"][name.replace("_quantized", "_zero_point")] == 128).all()
    tokens = random_tokens(8, 20, teacher.backbone.config.vocab_size, seed=7)
    with torch.no_grad():
        out = student(tokens.input_ids, tokens.attention_mask).numpy()
    expected = out.reshape(-1, out.shape[-1])
    exact = ["uint8", "int8"] if u8s8_products_exact() else ["uint8"]
    for layout in exact:
        got = _run(layouts[layout], tokens.input_ids.numpy(), tokens.attention_mask.numpy())
        cosine = min_row_cosine(got, expected)
        assert cosine > MIN_COSINE, (layout, cosine)


def test_encoder_tables_are_int8_by_default_in_a_form_each_runtime_takes(tmp_path):
    """The default (``embedding_bits: auto``) quantizes an encoder's tables (word, position, token type): int8
    rows gathered, then a per-tensor DequantizeLinear and the rows' scales, in both flavours (TensorRT's lint
    passes); a causal LM keeps its tables float unless asked."""
    assert QuantConfig().table_bits("classification") == QuantConfig().table_bits("embedding") == 8
    assert QuantConfig().table_bits("causal-lm") is None
    assert QuantConfig(embedding_bits=None).table_bits("embedding") is None
    _, _, contract, graphs = student_and_graphs("bert", W8A8, tmp_path)
    assert [name.rpartition(".")[2] for name in contract.embeddings] == [
        "word_embeddings", "position_embeddings", "token_type_embeddings"
    ]  # fmt: skip
    for graph in graphs.values():
        inits = {i.name: i for i in graph.graph.initializer}
        for name in contract.embeddings:
            assert f"backbone.{name}.weight" not in inits  # no float table left
            assert inits[f"{name}.weight_quantized"].data_type == TensorProto.INT8
    assert check_trt_compatible(graphs["trt"]) == []
    assert not student_and_graphs("llama", W8A8, tmp_path)[2].embeddings


@pytest.mark.parametrize(
    ("quant", "bits", "block"), [(W4A8_G32_DYNAMIC, 4, 32), (W8A8_DYNAMIC, 8, 32), (W4A8_DYNAMIC, 4, 16)]
)
def test_per_block_activations_are_matmul_nbits_int8_compute_in_the_cpu_flavour_only(quant, bits, block, tmp_path):
    teacher, _, contract, graphs = student_and_graphs("bert", quant, tmp_path)
    assert set(graphs) == {"cpu"}
    nodes = graphs["cpu"].graph.node
    kernels = [{a.name: a.i for a in n.attribute} for n in nodes if n.op_type == "MatMulNBits"]
    assert len(kernels) == len(contract.layers)
    assert all((k["accuracy_level"], k["bits"], k["block_size"]) == (4, bits, block) for k in kernels)
    assert not [n for n in nodes if n.op_type == "QuantizeLinear"]  # the kernel quantizes its own input
    float_graph = export_onnx(contract_export_model(teacher, contract), tmp_path / "f.onnx", 17)
    with pytest.raises(ExportUnsupported, match="per-block dynamic activations .* static per tensor"):
        quantize_graph(float_graph, contract, "trt")


@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 128), (8, 32), (8, 64)])
def test_matmul_nbits_int8_compute_is_what_the_student_simulates(bits, block):
    """ONNX Runtime's MatMulNBits with accuracy_level 4 quantizes its input per row and weight block at
    max|x| / 127: the student's DynamicBlockQuantizer, so one kernel matches one QuantLinear to float rounding."""
    n, k = 48, 256
    layer = QuantLinear(
        torch.nn.Linear(k, n, bias=False),
        QuantConfig(
            weights=WeightQuant(bits=bits, granularity="per-group", group_size=block) if bits == 4 else WeightQuant(),
            activations=ActivationQuant(granularity="per-block", block_size=None if bits == 4 else block),
        ),
    )
    layer.weight_quantizer.init_from_tensor(layer.weight, "minmax")
    q = layer.weight_quantizer.to_int(layer.weight).numpy().astype(np.int16) + (1 << (bits - 1))
    scale = layer.weight_quantizer.scale.detach().numpy().reshape(n, -1)
    scale = np.repeat(scale, k // block, axis=1) if scale.shape[1] == 1 else scale
    u = q.reshape(n, k // block, block).astype(np.uint8)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else u
    node = helper.make_node(
        "MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
        accuracy_level=4,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "one_layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scale.astype(np.float32).reshape(-1), "s")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    x = torch.randn(37, k) * torch.rand(k) * 4  # uneven channel ranges, an odd row count
    got = ort_session(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        expected = layer(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("activations", [ActivationQuant(bits=16), ActivationQuant(init="minmax")], ids=["A16", "A8"])
def test_zero_points_are_matmul_nbits_zero_points_and_the_trt_flavour_is_refused(activations, tmp_path):
    """Asymmetric int4 in the CPU flavour: MatMulNBits with the contract's zero points, packed two per byte
    with each row padded (hidden 96 in groups of 32: three blocks a row), computing the student; the TensorRT
    flavour (symmetric) is refused with the reason."""
    teacher = tiny_teacher("llama", hidden=96)
    quant = QuantConfig(weights=ASYMMETRIC_G32, activations=activations)
    tokens = random_tokens(16, 20, teacher.backbone.config.vocab_size, seed=0)
    student = build_student(teacher, quant)
    init_ranges(student, quant, tokens.batches(8))
    contract = build_contract(student)
    assert all(spec.zero_point for spec in contract.layers)
    assert (contract.tensors["model.layers.0.self_attn.q_proj.weight_zero_point"] != 0).any()
    float_graph = export_onnx(contract_export_model(teacher, contract), tmp_path / "f.onnx", 17)
    with pytest.raises(ExportUnsupported, match="asymmetric weights .* the trt flavour is symmetric"):
        quantize_graph(float_graph, contract, "trt")
    graph = quantize_graph(float_graph, contract, "cpu")
    inits = {init.name: init for init in graph.graph.initializer}
    kernels = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(kernels) == len(contract.layers) and all(len(n.input) == 4 for n in kernels)
    q_zero = numpy_helper.to_array(inits["model.layers.0.self_attn.q_proj.weight_zero_points"])
    assert q_zero.shape == (96 * 2,)  # 96 rows x ceil(3 blocks / 2) bytes
    ids, mask = tokens.input_ids.numpy()[:4], tokens.attention_mask.numpy()[:4]
    with torch.no_grad():
        expected = student(tokens.input_ids[:4], tokens.attention_mask[:4]).numpy()
    assert min_row_cosine(_run(graph, ids, mask), expected) > MIN_COSINE
