"""Quadapter: an equivalent transformation in float, folded into norms / producer rows without extra ops."""

from __future__ import annotations

import copy

import pytest
import torch

from calib.config import QuadapterConfig, QuantConfig
from calib.contract import build_contract
from calib.inputs import random_tokens
from calib.quadapter import fold_quadapters
from calib.student import build_student, init_ranges, quadapter_owners, quant_layers
from exporters.onnx_export import contract_export_model, export_onnx
from exporters.onnx_qdq import quantize_graph
from tests.models import tiny_teacher


def _float_student(family: str, positions: str = "foldable"):
    """A student with random Quadapter scales and its quantizers switched off: a float model."""
    teacher = tiny_teacher(family)
    quadapter = QuadapterConfig(enabled=True, positions=positions, init="ones")
    quant = QuantConfig(embedding_bits=None, quadapter=quadapter)  # float tables: only the layers' quantizers
    student = build_student(teacher, quant)
    generator = torch.Generator().manual_seed(1)
    for group in quadapter_owners(student).values():
        group[0].quadapter.scale.data = torch.rand(group[0].in_features, generator=generator) * 4 + 0.25
    init_ranges(student, quant, random_tokens(8, 16, 512, seed=0).batches(8))
    for layer in quant_layers(student).values():
        layer.weight_quantizer.enabled = False
        layer.input_quantizer.enabled = False
    return teacher, student


@pytest.mark.parametrize(
    ("family", "positions"), [("gpt2", "foldable"), ("llama", "foldable"), ("bert", "all"), ("qwen2", "all")]
)
def test_quadapter_and_its_folding_leave_the_float_function_unchanged(family, positions):
    teacher, student = _float_student(family, positions)
    assert quadapter_owners(student), "no Quadapter was attached"
    tokens = random_tokens(4, 16, 512, seed=2)
    with torch.no_grad():
        expected = teacher(tokens.input_ids, tokens.attention_mask)
        with_quadapter = student(tokens.input_ids, tokens.attention_mask)
        folded = copy.deepcopy(student)
        fold_quadapters(folded.backbone, folded.quadapter_groups)
        after_fold = folded(tokens.input_ids, tokens.attention_mask)
    assert (with_quadapter - expected).abs().max() < 1e-5
    assert (after_fold - expected).abs().max() < 1e-5
    remaining = [layer for layer in quant_layers(folded).values() if layer.quadapter is not None]
    unfoldable = {name for group in student.quadapter_groups if group.fold is None for name in group.layers}
    assert {n for n, layer in quant_layers(folded).items() if layer.quadapter is not None} == unfoldable
    assert len(remaining) == len(unfoldable)


def test_bert_foldable_positions_fold_only_into_the_value_rows():
    _, student = _float_student("bert")
    assert [g.fold[0] for g in student.quadapter_groups] == ["rows", "rows"]  # attention.output.dense per block


def _graph_ops(family: str, quadapter: QuadapterConfig, tmp_path):
    teacher = tiny_teacher(family)
    quant = QuantConfig(quadapter=quadapter)
    student = build_student(teacher, quant)
    init_ranges(student, quant, random_tokens(16, 16, 512, seed=0).batches(8))
    contract = build_contract(student)
    float_graph = export_onnx(contract_export_model(teacher, contract), tmp_path / f"{family}.onnx", 17)
    graph = quantize_graph(float_graph, contract, "trt")
    return sorted(n.op_type for n in graph.graph.node)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "qwen2"])
def test_folded_quadapter_adds_no_op_to_the_exported_graph(family, tmp_path):
    plain = _graph_ops(family, QuadapterConfig(enabled=False), tmp_path)
    folded = _graph_ops(family, QuadapterConfig(enabled=True), tmp_path)
    # The exporter may fold a few constant-handling nodes differently (identical all-ones norm weights of
    # a fresh model are shared through Identity nodes), so: no op type occurs more often after folding.
    for op in set(folded):
        assert folded.count(op) <= plain.count(op), op
    assert folded.count("Mul") == plain.count("Mul") and folded.count("Div") == plain.count("Div")


def test_unfoldable_bert_positions_add_one_mul_per_group(tmp_path):
    plain = _graph_ops("bert", QuadapterConfig(enabled=False), tmp_path)
    every = _graph_ops("bert", QuadapterConfig(enabled=True, positions="all"), tmp_path)
    assert every.count("Mul") - plain.count("Mul") == 2 * 2  # (QKV input, intermediate input) x 2 blocks
    assert len(every) - len(plain) == 4


def test_smoothquant_init_moves_activation_outliers_into_the_weights():
    teacher = tiny_teacher("llama")
    quant = QuantConfig(quadapter=QuadapterConfig(enabled=True, init="smoothquant", alpha=0.5))
    student = build_student(teacher, quant)
    with torch.no_grad():  # give one input channel of the first norm a large outlier
        student.backbone.model.layers[0].input_layernorm.weight[3] = 50.0
        teacher.backbone.model.layers[0].input_layernorm.weight[3] = 50.0
    init_ranges(student, quant, random_tokens(16, 16, 512, seed=0).batches(8))
    scale = student.backbone.model.layers[0].self_attn.q_proj.quadapter.scale
    assert scale[3] == scale.max() and scale[3] > 3 * scale.median()
