"""Quantizers: rounding error bounds, LSQ's gradient, integer export."""

from __future__ import annotations

import math

import pytest
import torch

from calib.quant_linear import FP16_MIN_STEP, QuantEmbedding, float16_step
from calib.quantizers import DynamicBlockQuantizer, TensorQuantizer


@pytest.mark.parametrize(
    ("bits", "granularity", "group"),
    [(8, "per-channel", None), (4, "per-group", 32), (2, "per-channel", None), (8, "per-tensor", None)],
)
def test_fake_quant_error_is_at_most_half_a_step_inside_the_range(bits, granularity, group):
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    q = TensorQuantizer(bits, granularity, group)
    q.init_from_tensor(weight, "minmax")
    deq = q(weight)
    grouped_scale = q.scale if granularity != "per-group" else q.scale.expand(16, 2, 32).reshape(16, 64)
    step = grouped_scale.expand_as(weight) if grouped_scale.dim() else grouped_scale
    inside = (weight / step <= q.qmax) & (weight / step >= q.qmin)
    assert ((deq - weight).abs() <= step / 2 + 1e-6)[inside].all()
    ints = q.to_int(weight)
    assert ints.min() >= q.qmin and ints.max() <= q.qmax
    assert torch.equal(ints, torch.round(ints))


def test_minmax_init_maps_the_largest_value_onto_qmax():
    q = TensorQuantizer(8, "per-channel")
    weight = torch.tensor([[0.5, -1.27, 0.0], [2.54, 1.0, -0.3]])
    q.init_from_tensor(weight, "minmax")
    assert torch.allclose(q.scale.squeeze(), torch.tensor([0.01, 0.02]))
    assert q.to_int(weight)[0, 1] == -127 and q.to_int(weight)[1, 0] == 127


def test_lsq_step_size_gradient_matches_the_paper_on_a_hand_computed_case():
    """LSQ (Esser et al. 2019, eq. 3 with g = 1/sqrt(N * Qp)): d x_hat / d s is
    -v/s + round(v/s) inside the range, -Qn below it and Qp above it, times g."""
    q = TensorQuantizer(4)  # Qn = -8 (lowest integer), Qp = 7
    q.set_scale(torch.tensor(0.5))
    q.scale.requires_grad_(True)  # LSQ: the step size is a trained parameter
    x = torch.tensor([0.3, -1.1, 5.0, -9.0])
    q(x).sum().backward()
    # v/s = 0.6, -2.2, 10 (clipped to 7), -18 (clipped to -8)
    per_element = [(-0.6 + 1.0), (2.2 - 2.0), 7.0, -8.0]
    g = 1.0 / math.sqrt(x.numel() * 7)
    assert q.scale.grad.item() == pytest.approx(sum(per_element) * g, rel=1e-5)


def test_straight_through_gradient_passes_inside_and_blocks_outside():
    q = TensorQuantizer(8)
    q.set_scale(torch.tensor(0.1))
    x = torch.tensor([0.33, -20.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_clipping_inits_clip_outliers_harder_than_minmax(method):
    torch.manual_seed(0)
    weight = torch.randn(4, 512)
    weight[:, 0] = 40.0  # one outlier per row
    minmax, other = TensorQuantizer(4, "per-channel"), TensorQuantizer(4, "per-channel")
    minmax.init_from_tensor(weight, "minmax")
    other.init_from_tensor(weight, method)
    assert (other.scale < minmax.scale).all()
    err = lambda q: (q(weight) - weight)[:, 1:].pow(2).mean()  # noqa: E731
    assert err(other) < err(minmax)


def test_two_bit_mse_init_keeps_the_weights_min_max_rounds_to_zero():
    # At 2 bits (levels -2..1 steps) min-max sets the step to the row's absmax, so nearly every weight rounds to
    # 0; the MSE search must find steps well below a fifth of the absmax when one outlier sets it.
    torch.manual_seed(0)
    weight = torch.randn(8, 512)
    weight[:, 0] = 12.0
    minmax, mse = TensorQuantizer(2, "per-channel"), TensorQuantizer(2, "per-channel")
    minmax.init_from_tensor(weight, "minmax")
    mse.init_from_tensor(weight, "mse")
    zeros = lambda q: (q.to_int(weight) == 0).float().mean()  # noqa: E731
    assert zeros(minmax) > 0.95 and zeros(mse) < 0.6
    assert (mse.scale.flatten() < 0.2 * 12.0).all()
    fifth = TensorQuantizer(2, "per-channel")
    fifth.set_scale(torch.full_like(mse.scale, 0.2 * 12.0))
    err = lambda q: (q(weight) - weight).pow(2).mean()  # noqa: E731
    assert err(mse) < err(fifth) < err(minmax)


def test_frozen_weights_compute_the_same_function_and_save_the_same_state():
    from calib.config import QuadapterConfig, QuantConfig
    from calib.inputs import random_tokens
    from calib.student import build_student, freeze_weights, init_ranges
    from tests.models import tiny_teacher

    quant = QuantConfig(quadapter=QuadapterConfig(enabled=True, positions="all"))
    student = build_student(tiny_teacher("llama"), quant)
    tokens = random_tokens(8, 12, student.backbone.config.vocab_size, seed=0)
    init_ranges(student, quant, tokens.batches(8))
    with torch.no_grad():
        live = student(tokens.input_ids, tokens.attention_mask)
        keys = set(student.state_dict())
        frozen = freeze_weights(student)(tokens.input_ids, tokens.attention_mask)
    assert torch.equal(live, frozen) and set(student.state_dict()) == keys


def test_dynamic_blocks_put_each_blocks_largest_value_on_the_grid_edge():
    quantizer = DynamicBlockQuantizer(4)
    x = torch.tensor([[0.5, -2.0, 1.0, 0.1, 0.0, 0.0, 0.0, 0.0], [3.0, 0.2, -0.7, 1.5, 0.01, -0.02, 0.03, 0.04]])
    out = quantizer(x)
    blocks, got = x.reshape(2, 2, 4), out.reshape(2, 2, 4)
    amax = blocks.abs().amax(-1, keepdim=True)
    step = amax / 127
    assert torch.equal(got.abs().amax(-1, keepdim=True), amax)  # the block's largest value survives exactly
    inside = step > 0
    assert ((got - blocks).abs() <= step / 2 + 1e-7)[inside.expand_as(blocks)].all()  # half a step at most
    assert torch.equal(got[0, 1], torch.zeros(4))  # an all-zero block stays zero (no division by zero)
    torch.testing.assert_close(got / torch.where(inside, step, 1), torch.round(got / torch.where(inside, step, 1)))


def test_dynamic_blocks_pass_the_gradient_straight_through():
    x = torch.randn(3, 32, requires_grad=True)
    DynamicBlockQuantizer(16)(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_table_steps_are_float16_values_and_clip_no_worse_than_min_max():
    scale = torch.tensor([1e-3, 3.3e-2, 0.12345, 1e-9, 2.0**-10])
    step = float16_step(scale)
    assert torch.equal(step.to(torch.float16).float(), step)  # stored as float16 without loss
    assert (step >= scale).all() and step[3] == FP16_MIN_STEP  # nothing clips; a near-zero row keeps a normal step
    assert step[4] == scale[4]  # already a float16 value: unchanged
    assert ((step - scale) / scale)[:3].max() < 2**-10  # at most one float16 ulp above
    source = torch.nn.Embedding(50, 64)
    table = QuantEmbedding(source, 8)
    q = table.weight_quantizer.to_int(table.weight)
    assert q.min() >= -128 and q.max() <= 127 and q.abs().amax(1).min() >= 100  # MSE clips little of a Gaussian row
    minmax = float16_step(source.weight.detach().abs().amax(1, keepdim=True) / 127)
    error = {
        "mse": (table.weight_quantizer(table.weight) - source.weight).pow(2).sum(1),
        "minmax": (torch.round(source.weight / minmax) * minmax - source.weight).pow(2).sum(1),
    }
    assert error["mse"].sum() < error["minmax"].sum()  # the clip search beats min-max over the table


def test_zero_points_fit_a_one_sided_group_a_symmetric_grid_spends_half_its_levels_on():
    x = torch.rand(8, 64, generator=torch.Generator().manual_seed(0)) + 0.5  # every value positive
    symmetric = TensorQuantizer(4, "per-group", 32)
    asymmetric = TensorQuantizer(4, "per-group", 32, zero_point=True)
    for quantizer in (symmetric, asymmetric):
        quantizer.init_from_tensor(x, "minmax")
    assert (asymmetric(x) - x).pow(2).mean() < 0.5 * (symmetric(x) - x).pow(2).mean()
    q, zero, scale = asymmetric.to_int(x), asymmetric.zero_point, asymmetric.scale
    assert q.min() >= -8 and q.max() <= 7 and torch.equal(zero, zero.round()) and (zero == -8).all()  # 0 = qmin
    assert (q.reshape(8, 2, 32).amax(-1) == 7).all()  # each group's max on the grid's top
    assert torch.allclose(((q.reshape(8, 2, 32) - zero) * scale).reshape(8, 64), asymmetric(x))


def test_an_mse_asymmetric_range_is_no_worse_than_min_max_on_heavy_tails():
    x = torch.distributions.StudentT(2.0).sample((16, 128)) + 0.3
    errors = {}
    for method in ("minmax", "mse"):
        quantizer = TensorQuantizer(4, "per-group", 64, zero_point=True)
        quantizer.init_from_tensor(x, method)
        errors[method] = (quantizer(x) - x).pow(2).mean()
    assert errors["mse"] < errors["minmax"]


def test_a_symmetric_quantizer_has_no_zero_point_to_set():
    quantizer = TensorQuantizer(4, "per-group", 32)
    assert quantizer.zero_point is None and "zero_point" not in quantizer.state_dict()
    with pytest.raises(ValueError, match="symmetric quantizer has no zero point"):
        quantizer.set_zero_point(torch.zeros(()))


def test_zero_points_are_part_of_the_saved_student_state():
    from calib.config import ActivationQuant, QuantConfig, WeightQuant
    from calib.inputs import random_tokens
    from calib.student import build_student, init_ranges, load_student_state, student_state
    from tests.models import tiny_teacher

    weights = WeightQuant(bits=4, granularity="per-group", group_size=32, zero_point=True, init="mse")
    quant = QuantConfig(weights=weights, activations=ActivationQuant(bits=16))
    teacher = tiny_teacher("llama")
    student = build_student(teacher, quant)
    init_ranges(student, quant, [])
    state = student_state(student, include_weights=False)
    assert any(key.endswith("weight_quantizer.zero_point") for key in state)
    fresh = build_student(teacher, quant)
    load_student_state(fresh, state)
    tokens = random_tokens(4, 12, teacher.backbone.config.vocab_size, seed=0)
    ids, mask = tokens.input_ids, tokens.attention_mask
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask), student(ids, mask))
