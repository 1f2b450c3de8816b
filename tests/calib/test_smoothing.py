"""Searched smoothing for int4 weights with float activations (W4A16): the search then scores the weights' rounding
error alone, and so scales up the weight columns that meet large activations before rounding (AWQ's idea);
what it is for (smaller int4 error), and that it folds into the CPU graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from calib.config import ActivationQuant, QuadapterConfig, QuantConfig, WeightQuant
from calib.contract import load_student
from calib.inputs import random_tokens
from calib.student import build_student, init_ranges
from tests.calib.test_rotation import _kl_to_teacher, _with_a_massive_down_input
from tests.exporters.test_onnx_qdq import MIN_COSINE, _run, min_row_cosine
from tests.models import student_and_graphs, tiny_teacher

W4A16_ASYM = QuantConfig(
    weights=WeightQuant(bits=4, granularity="per-group", group_size=32, zero_point=True),
    activations=ActivationQuant(bits=16),
)
SMOOTHED = QuadapterConfig(enabled=True, init="smoothquant-search")
W4A16_ASYM_SMOOTHED = dataclasses.replace(W4A16_ASYM, quadapter=SMOOTHED)


def test_searched_smoothing_scales_up_the_salient_channel_and_lowers_int4_error():
    teacher = _with_a_massive_down_input(tiny_teacher("llama"))
    batches = list(random_tokens(16, 24, teacher.backbone.config.vocab_size, seed=0).batches(8))
    student = build_student(teacher, W4A16_ASYM_SMOOTHED)
    init_ranges(student, W4A16_ASYM_SMOOTHED, batches)
    down = "model.layers.0.mlp.down_proj"
    assert student.smoothing[down] is not None  # the down projection's channel 7 meets 50x activations
    assert int(student.backbone.get_submodule(down).quadapter.scale.argmax()) == 7
    plain = _kl_to_teacher(teacher, W4A16_ASYM, batches)
    searched = _kl_to_teacher(teacher, W4A16_ASYM_SMOOTHED, batches)
    assert searched < plain, (searched, plain)


def test_smoothed_int4_student_folds_into_the_cpu_graph(tmp_path):
    teacher, student, contract, graphs = student_and_graphs("llama", W4A16_ASYM_SMOOTHED, tmp_path)
    assert set(graphs) == {"cpu"}  # asymmetric int4: MatMulNBits with zero points, no TensorRT flavour
    assert not [name for name in contract.tensors if name.endswith("input_multiplier")]  # every scale folded
    tokens = random_tokens(8, 20, teacher.backbone.config.vocab_size, seed=7)
    with torch.no_grad():
        expected = student(tokens.input_ids, tokens.attention_mask).numpy()
        rebuilt = load_student(teacher, W4A16_ASYM_SMOOTHED, contract)(tokens.input_ids, tokens.attention_mask).numpy()
    np.testing.assert_allclose(rebuilt, expected, atol=1e-5)  # folded scales: float rounding only (float inputs)
    cosine = min_row_cosine(_run(graphs["cpu"], tokens.input_ids.numpy(), tokens.attention_mask.numpy()), expected)
    assert cosine > MIN_COSINE, cosine
