"""Quantizer learning: it lowers the distillation loss, in both modes, and survives a NaN."""

from __future__ import annotations

import math

import pytest
import torch

from calib.config import LearnConfig, QuadapterConfig, QuantConfig, WeightQuant
from calib.families import block_of
from calib.inputs import random_tokens
from calib.learn import learn_quantizers, output_loss, relative_adamw
from calib.student import build_student, init_ranges, quant_layers
from tests.models import tiny_teacher

W4 = QuantConfig(weights=WeightQuant(bits=4, init="minmax"), quadapter=QuadapterConfig(enabled=True))


def _setup(family="gpt2"):
    teacher = tiny_teacher(family, hidden=64)
    student = build_student(teacher, W4)
    batches = random_tokens(32, 16, 512, seed=0).batches(8)
    init_ranges(student, W4, batches)
    return teacher, student, batches


@pytest.mark.parametrize("mode", ["end-to-end", "block-wise"])
def test_learning_lowers_the_loss_and_freezes_everything_afterwards(mode):
    teacher, student, batches = _setup()
    before = {n: layer.weight_quantizer.scale.clone() for n, layer in quant_layers(student).items()}
    result = learn_quantizers(teacher, student, batches, LearnConfig(steps=40, lr=1e-2, mode=mode), False)
    assert result.stopped_early is None and len(result.losses) == 40
    window = 4 if mode == "end-to-end" else 2  # block-wise: compare within the last block's run
    assert sum(result.losses[-window:]) < sum(result.losses[-20 : -20 + window])
    assert any(not torch.equal(before[n], layer.weight_quantizer.scale) for n, layer in quant_layers(student).items())
    assert not any(p.requires_grad for p in student.parameters())


def test_weights_are_learned_only_when_asked():
    teacher, student, batches = _setup()
    weights = {n: layer.weight.clone() for n, layer in quant_layers(student).items()}
    learn_quantizers(teacher, student, batches, LearnConfig(steps=5, lr=1e-2), False)
    assert all(torch.equal(weights[n], layer.weight) for n, layer in quant_layers(student).items())
    learn_quantizers(teacher, student, batches, LearnConfig(steps=5, lr=1e-2, params=("weights",)), False)
    assert any(not torch.equal(weights[n], layer.weight) for n, layer in quant_layers(student).items())


def test_weights_take_their_own_rate_relative_to_their_magnitude():
    step_size = torch.nn.Parameter(torch.full((4,), 0.02))
    weight = torch.nn.Parameter(torch.full((4, 4), -0.5))
    rates = [g["lr"] for g in relative_adamw([step_size], [weight], LearnConfig(lr=1e-2, weights_lr=1e-4)).param_groups]
    assert rates == pytest.approx([1e-2 * 0.02, 1e-4 * 0.5])
    same = [g["lr"] for g in relative_adamw([step_size], [weight], LearnConfig(lr=1e-2)).param_groups]
    assert same == pytest.approx([1e-2 * 0.02, 1e-2 * 0.5])


def test_a_nan_loss_stops_learning_and_keeps_the_last_good_state():
    teacher, student, batches = _setup()
    layer = next(iter(quant_layers(student).values()))
    calls = {"n": 0}
    original = layer.forward

    def poisoned(x):
        calls["n"] += 1
        out = original(x)
        return out * float("nan") if calls["n"] > 3 else out

    layer.forward = poisoned
    good = layer.weight_quantizer.scale.clone()
    result = learn_quantizers(teacher, student, batches, LearnConfig(steps=10, lr=1e-2), False)
    assert result.stopped_early and "nan" in result.stopped_early
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert torch.isfinite(layer.weight_quantizer.scale).all()
    assert not torch.equal(layer.weight_quantizer.scale, good)  # three good steps were kept


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_block_wise_runs_one_block_at_a_time_as_the_whole_model_would(family):
    """Block-wise learning never runs the whole student (one block's activations in memory at a time): each
    step runs one block on its cached inputs."""
    teacher, student, batches = _setup(family)
    blocks = sorted({block_of(n) for n in quant_layers(student)} - {None})
    calls = dict.fromkeys(blocks, 0)
    head = {"calls": 0}
    for name in blocks:
        student.backbone.get_submodule(name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    last_module = student.backbone.get_output_embeddings() if family != "bert" else student.backbone.classifier
    last_module.register_forward_hook(lambda *_: head.__setitem__("calls", head["calls"] + 1))
    steps_per_block = 3
    learn_quantizers(teacher, student, batches, LearnConfig(steps=steps_per_block * len(blocks), mode="block-wise"),
                     False)  # fmt: skip
    assert head["calls"] == 0  # never a whole forward
    # each block: its steps, plus (all but the last) one pass over every batch to make the next block's inputs
    assert [calls[b] for b in blocks] == [steps_per_block + len(batches)] * (len(blocks) - 1) + [steps_per_block]


def test_a_regression_head_is_distilled_by_its_score_not_by_a_constant_softmax():
    teacher = torch.tensor([[0.5], [2.0], [-1.0]])
    assert output_loss("classification", teacher, teacher, torch.ones(3)) == 0
    moved = output_loss("classification", teacher + 0.5, teacher, torch.ones(3))
    assert moved > 0  # a KL over one logit's softmax would be 0 for any student
    student = (teacher + 0.5).requires_grad_(True)
    output_loss("classification", student, teacher, torch.ones(3)).backward()
    assert student.grad.abs().sum() > 0
