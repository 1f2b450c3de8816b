"""Placement: every Linear / Conv1D in attention and MLP blocks, nothing else."""

from __future__ import annotations

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

from calib.config import QuantConfig
from calib.placement import quantizable_layers
from calib.quant_linear import QuantLinear
from calib.student import build_student
from tests.models import tiny_teacher

EXPECTED_PER_BLOCK = {
    "bert": {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    },
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "llama": {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    },
}
EXPECTED_PER_BLOCK["qwen2"] = EXPECTED_PER_BLOCK["llama"]
BLOCK_PREFIX = {"bert": "encoder.layer.", "gpt2": "h.", "llama": "layers.", "qwen2": "layers."}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2"])
def test_every_block_linear_is_quantized_and_nothing_else(family):
    teacher = tiny_teacher(family)
    names = quantizable_layers(teacher.backbone)
    prefix = BLOCK_PREFIX[family]
    expected = {f"{prefix}{i}.{leaf}" for i in range(2) for leaf in EXPECTED_PER_BLOCK[family]}
    # strip the head wrapper's prefix (bert., transformer., model.)
    assert {n[n.index(prefix) :] for n in names} == expected
    student = build_student(teacher, QuantConfig())
    quantized = {n for n, m in student.backbone.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(names)
    left_float = [n for n, m in student.backbone.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    assert all(("lm_head" in n or "classifier" in n or "score" in n or "pooler" in n) for n in left_float), left_float
    assert all(
        not isinstance(m, QuantLinear)
        for m in student.backbone.modules()
        if isinstance(m, (nn.Embedding, nn.LayerNorm))
    )


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "qwen2"])
def test_layers_reading_one_tensor_share_one_input_quantizer(family):
    student = build_student(tiny_teacher(family), QuantConfig())
    layers = [m for m in student.backbone.modules() if isinstance(m, QuantLinear)]
    distinct = {id(layer.input_quantizer) for layer in layers}
    shared_per_block = {"bert": 2, "llama": 3, "gpt2": 0, "qwen2": 3}[family]  # quantizers saved by sharing, per block
    assert len(distinct) == len(layers) - 2 * shared_per_block


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_lm_head_is_quantized_only_when_asked(family):
    teacher = tiny_teacher(family)
    assert "lm_head" not in quantizable_layers(teacher.backbone)
    student = build_student(teacher, QuantConfig(lm_head=True))
    head = student.backbone.lm_head
    assert isinstance(head, QuantLinear) and head.input_quantizer is not None
    assert isinstance(teacher.backbone.lm_head, nn.Linear)  # the teacher keeps its float head
