"""GPTQ: round-to-nearest when inputs are uncorrelated, lower output error than it when they are, and a
student whose weights stay on their grid, smoothed and rotated ones included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calib.config import (
    CalibConfig,
    GeneratorConfig,
    LearnConfig,
    QuadapterConfig,
    QuantConfig,
    RotationConfig,
    SamSgaConfig,
    TaskConfig,
    WeightQuant,
)
from calib.contract import build_contract, load_student
from calib.gptq import apply_gptq, gptq_weight
from calib.inputs import random_token_source, random_tokens
from calib.methods import CalibrationRequest, calibrate, quantize_student
from calib.quantizers import TensorQuantizer
from calib.student import build_student, init_ranges, quant_layers
from calib.zsaq import anchor_start, build_generator, game_student_state, generated_set
from tests.exporters.test_onnx_qdq import MAX_REL_DIFF
from tests.models import discrepancy, tiny_teacher


def _quantizer(weight: torch.Tensor, granularity: str) -> TensorQuantizer:
    """``per-group-asymmetric``: groups with zero points."""
    grouped = granularity.startswith("per-group")
    quantizer = TensorQuantizer(4, granularity.removesuffix("-asymmetric"), 16 if grouped else None,
                                zero_point=granularity.endswith("asymmetric"))  # fmt: skip
    quantizer.init_from_tensor(weight, "minmax")
    return quantizer


GRANULARITIES = ["per-channel", "per-group", "per-group-asymmetric"]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_an_identity_hessian_gives_round_to_nearest(granularity):
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    quantizer = _quantizer(weight, granularity)
    assert torch.allclose(gptq_weight(weight, torch.eye(64), quantizer, damp=0.0), quantizer(weight), atol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_correlated_inputs_get_a_smaller_output_error_than_round_to_nearest(granularity):
    rng = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 64, generator=rng)
    mixing = torch.randn(64, 64, generator=rng)
    inputs = torch.randn(2048, 64, generator=rng) @ mixing  # strongly correlated input channels
    quantizer = _quantizer(weight, granularity)
    rounded = gptq_weight(weight, inputs.T @ inputs, quantizer)
    assert torch.allclose(quantizer(rounded), rounded, atol=1e-5)  # on the grid
    gptq_error = (inputs @ (weight - rounded).T).pow(2).mean()
    rtn_error = (inputs @ (weight - quantizer(weight)).T).pow(2).mean()
    assert gptq_error < 0.7 * rtn_error


def test_columns_are_visited_by_decreasing_hessian_diagonal_not_by_position():
    """Act-order: permuting the input channels (weight columns and Hessian alike) permutes the result, because
    the visiting order follows the Hessian's diagonal; static groups keep each column's own step."""
    rng = torch.Generator().manual_seed(2)
    weight = torch.randn(16, 64, generator=rng)
    inputs = (torch.randn(1024, 64, generator=rng) @ torch.randn(64, 64, generator=rng)) * torch.linspace(0.1, 3, 64)
    hessian = inputs.T @ inputs
    quantizer = _quantizer(weight, "per-channel")  # one step per row: the same grid in any column order
    perm = torch.randperm(64, generator=rng)
    direct = gptq_weight(weight, hessian, quantizer)
    permuted = gptq_weight(weight[:, perm], hessian[perm][:, perm], quantizer)
    assert torch.allclose(permuted, direct[:, perm], atol=1e-5)
    grouped = _quantizer(weight, "per-group")  # static groups: every column rounds onto its own group's grid
    rounded = gptq_weight(weight, hessian, grouped)
    assert torch.allclose(grouped(rounded), rounded, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize(
    ("family", "quant"),
    [("bert", QuantConfig(weights=WeightQuant(bits=4))),
     ("llama", QuantConfig(weights=WeightQuant(bits=4), lm_head=True))],  # the head: outside the blocks
    ids=["bert", "llama-with-head"],
)  # fmt: skip
def test_gptq_on_a_student_keeps_weights_on_grid_and_lowers_thediscrepancy(family, quant):
    teacher = tiny_teacher(family, hidden=64)
    batches = random_tokens(32, 16, 512, seed=0).batches(8)

    student = build_student(teacher, quant)
    init_ranges(student, quant, batches)
    before = discrepancy(teacher, student, batches)
    apply_gptq(student, batches)
    for layer in quant_layers(student).values():
        w = layer.weight
        assert torch.allclose(layer.weight_quantizer(w), w, atol=1e-6)
    assert discrepancy(teacher, student, batches) < before


SMOOTHED = {
    "bert": QuantConfig(weights=WeightQuant(bits=4), quadapter=QuadapterConfig(enabled=True)),
    "qwen2-rotated": QuantConfig(  # grouped KV heads, online Hadamard before down_proj
        weights=WeightQuant(bits=4),
        rotation=RotationConfig(enabled=True),
        quadapter=QuadapterConfig(enabled=True, init="smoothquant-search"),
    ),
}


@torch.no_grad()
@pytest.mark.parametrize("name", list(SMOOTHED))
def test_gptq_under_smoothing_rounds_the_scaled_weights_and_survives_the_fold(name):
    """GPTQ after SmoothQuant-style scales: the weights the quantizers see (``W * a``, rotated) land on their grid,
    the discrepancy drops, and folding the scales into the neighbours (the export contract) keeps the student."""
    family = name.removesuffix("-rotated")
    teacher, quant = tiny_teacher(family, hidden=64), SMOOTHED[name]
    vocab = teacher.backbone.config.vocab_size
    for module in teacher.backbone.modules():  # one MLP channel 50x the rest: smoothing's scales are far from 1
        if isinstance(module, torch.nn.Linear) and module.out_features == 128:
            module.weight[7] *= 50
        if isinstance(module, torch.nn.Linear) and module.in_features == 128:
            module.weight[:, 7] /= 50
    batches = list(random_tokens(16, 16, vocab, seed=0).batches(8))
    student = build_student(teacher, quant)
    init_ranges(student, quant, batches)
    layers = quant_layers(student)
    assert any(float((layer.quadapter.scale - 1).abs().max()) > 0.1 for layer in layers.values() if layer.quadapter)

    before = discrepancy(teacher, student, batches)
    apply_gptq(student, batches)
    for layer in layers.values():
        effective = layer.effective_weight()
        assert torch.allclose(layer.weight_quantizer(effective), effective, atol=1e-5)
    assert discrepancy(teacher, student, batches) < before
    tokens = random_tokens(4, 16, vocab, seed=5)
    expected = student(tokens.input_ids, tokens.attention_mask)
    rebuilt = load_student(teacher, quant, build_contract(student))(tokens.input_ids, tokens.attention_mask)
    span = float(expected.max() - expected.min())
    np.testing.assert_allclose(rebuilt, expected, atol=MAX_REL_DIFF * span)


@pytest.mark.parametrize("start", ["nearest", "gptq"])
def test_the_game_starts_from_gptqs_rounding_on_the_generators_first_samples(start):
    """With ``sam_sga.start: gptq`` the game's student holds the weights GPTQ gives on the samples its ranges were
    initialised on (weights not learned here, so they are still the starting ones when the game ends)."""
    teacher = tiny_teacher("bert", hidden=64)
    calib = CalibConfig(
        method="zsaq", samples=8, seq_len=16, batch_size=4,
        generator=GeneratorConfig(kind="soft-tokens", batch_size=4, min_len=4),
        sam_sga=SamSgaConfig(rounds=2, start=start),
    )  # fmt: skip
    quant = QuantConfig(weights=WeightQuant(bits=4), learn=LearnConfig(params=("step-sizes",)))
    request = CalibrationRequest(teacher, None, calib, quant, TaskConfig(kind=teacher.kind), show_progress=False)
    played = calibrate(request).game.student

    rng = torch.Generator().manual_seed(calib.seed)
    first = generated_set(build_generator(calib, teacher, ()), calib.samples, calib.batch_size, rng).batches(4)
    expected = build_student(teacher, quant)
    init_ranges(expected, quant, first)
    apply_gptq(expected, first)
    rounded = quant_layers(expected)
    for name, layer in quant_layers(played).items():
        assert torch.equal(layer.weight, rounded[name].weight) == (start == "gptq")
    # quantize rebuilds the student from the teacher and the game's state: GPTQ's weights must come with it
    state = game_student_state(played, calib, quant.learn)
    final = quant_layers(quantize_student(teacher, quant, first, state, show_progress=False)[0])
    for name, layer in quant_layers(played).items():
        assert torch.equal(final[name].weight, layer.weight)


def test_with_an_anchor_the_games_start_rounds_on_the_generators_samples_and_as_many_random_tokens():
    """``sam_sga.anchor``: the start's ranges and GPTQ see the random tokens the student will also learn on,
    drawn after the generator's first samples from the same stream."""
    teacher = tiny_teacher("bert", hidden=64)
    calib = CalibConfig(
        method="zsaq", samples=8, seq_len=16, batch_size=4,
        generator=GeneratorConfig(kind="soft-tokens", batch_size=4, min_len=4),
        sam_sga=SamSgaConfig(rounds=1, start="gptq", anchor=0.5),
    )  # fmt: skip
    quant = QuantConfig(weights=WeightQuant(bits=4), learn=LearnConfig(params=("step-sizes",)))
    request = CalibrationRequest(teacher, None, calib, quant, TaskConfig(kind=teacher.kind), show_progress=False)
    played = quant_layers(calibrate(request).game.student)

    rng = torch.Generator().manual_seed(calib.seed)
    first = generated_set(build_generator(calib, teacher, ()), calib.samples, calib.batch_size, rng).batches(4)
    tokens = anchor_start(random_token_source(teacher, None, calib.seq_len), calib.samples, calib.batch_size, rng)
    assert all(batch.input_ids is not None for batch in tokens)
    for inputs, matches in ((first + tokens, True), (first, False)):
        expected = build_student(teacher, quant)
        init_ranges(expected, quant, inputs)
        apply_gptq(expected, inputs)
        same = [torch.equal(layer.weight, played[name].weight) for name, layer in quant_layers(expected).items()]
        assert all(same) if matches else not any(same)
