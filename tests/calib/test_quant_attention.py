"""Attention-matmul quantization: the same attention as each family's own, plus Q/DQ on four inputs."""

from __future__ import annotations

import onnx
import pytest
import torch

from calib.config import QuantConfig
from calib.contract import build_contract
from calib.inputs import random_tokens
from calib.quant_attention import ROLES
from calib.student import attention_quantizers, build_student, init_ranges, student_state
from exporters.onnx_export import contract_export_model, export_onnx
from exporters.onnx_qdq import quantize_graph
from exporters.trt_check import check_trt_compatible
from tests.models import tiny_teacher

ATTENTION = QuantConfig(attention_matmuls=True)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2"])
def test_with_its_quantizers_off_the_attention_is_the_models_own(family):
    teacher = tiny_teacher(family)
    student = build_student(teacher, ATTENTION)
    for layer in student.modules():
        if hasattr(layer, "enabled"):
            layer.enabled = False
    tokens = random_tokens(4, 12, teacher.backbone.config.vocab_size, seed=3)
    with torch.no_grad():
        expected = teacher(tokens.input_ids, tokens.attention_mask)
        got = student(tokens.input_ids, tokens.attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2"])
def test_ranges_learnable_state_and_contract_cover_the_four_inputs(family, tmp_path):
    teacher = tiny_teacher(family)
    batches = list(random_tokens(8, 16, teacher.backbone.config.vocab_size, seed=0).batches(8))
    student = build_student(teacher, ATTENTION)
    init_ranges(student, ATTENTION, batches)
    groups = attention_quantizers(student)
    assert len(groups) == teacher.backbone.config.num_hidden_layers
    probs_scales = [group.quantizer("probs").scale.item() for group in groups.values()]
    assert all(0 < s <= 1.0 / 127 + 1e-7 for s in probs_scales)  # softmax outputs never exceed 1
    state = student_state(student, include_weights=False)
    assert sum(".attn_quantizers." in k for k in state) == len(groups) * len(ROLES)
    contract = build_contract(student)
    assert contract.attention == list(groups)
    graph = export_onnx(contract_export_model(teacher, contract), tmp_path / "f.onnx", 17)
    trt = quantize_graph(graph, contract, "trt")
    quantize_ops = sum(n.op_type == "QuantizeLinear" for n in trt.graph.node)
    plain_student = build_student(teacher, QuantConfig())
    init_ranges(plain_student, QuantConfig(), batches)
    plain = quantize_graph(graph, build_contract(plain_student), "trt")
    assert quantize_ops - sum(n.op_type == "QuantizeLinear" for n in plain.graph.node) == 4 * len(groups)
    assert check_trt_compatible(trt) == []
    onnx.checker.check_model(trt, full_check=True)
