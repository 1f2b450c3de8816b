"""Calibration methods from the registry: the inputs of the methods without a generator (shapes, what they
avoid, who may use them), and one quantize_student for every caller."""

from __future__ import annotations

import pytest
import torch

from calib.config import CalibConfig, QuantConfig, TaskConfig, WeightQuant
from calib.errors import ConfigError
from calib.inputs import CalibrationSet
from calib.methods import Calibration, CalibrationRequest, calibrate, quantize_student
from calib.models import TaskModel, embedding_table
from calib.registry import GENERATORS, METHODS
from calib.student import quant_layers
from tests.models import minilm_tokenizer, tiny_teacher


def _calibrate(method: str, teacher: TaskModel) -> Calibration:
    calib = CalibConfig(method=method, samples=6, seq_len=12, seed=3)
    return calibrate(CalibrationRequest(teacher, None, calib, QuantConfig(), TaskConfig(kind=teacher.kind)))


def test_every_registered_method_and_generator_kind_loads():
    assert all(callable(entry.load()) for entry in (*METHODS.values(), *GENERATORS.values()))
    assert [name for name, m in METHODS.items() if m.uses_data] == ["real-data"]
    assert [name for name, m in METHODS.items() if m.trains_student] == ["zsaq"]


def test_random_tokens_and_gaussian_embeds_have_the_configured_shape_and_vary_in_length():
    teacher = tiny_teacher("bert")
    tokens = _calibrate("random-tokens", teacher).samples
    assert tokens.input_ids.shape == (6, 12) and tokens.inputs_embeds is None
    embeds = _calibrate("gaussian-embeds", teacher).samples
    table = embedding_table(teacher)
    assert embeds.inputs_embeds.shape == (6, 12, table.shape[1]) and embeds.input_ids is None
    assert len(set(embeds.attention_mask.sum(1).tolist())) > 1
    padded = embeds.inputs_embeds[embeds.attention_mask == 0]
    assert torch.all(padded == 0)  # padding positions carry no signal


def test_teacher_sampled_text_comes_from_a_causal_lm_only():
    sampled = _calibrate("teacher-sampled", tiny_teacher("gpt2"))
    assert sampled.game is None
    assert sampled.samples.input_ids.shape == (6, 12) and bool(sampled.samples.attention_mask.all())
    again = _calibrate("teacher-sampled", tiny_teacher("gpt2")).samples
    assert torch.equal(sampled.samples.input_ids, again.input_ids)  # seeded
    with pytest.raises(ConfigError, match="teacher-sampled needs a causal-lm teacher, not classification"):
        _calibrate("teacher-sampled", tiny_teacher("bert"))


def test_real_data_needs_a_tokenizer():
    with pytest.raises(ConfigError, match="no tokenizer"):
        _calibrate("real-data", tiny_teacher("bert"))


def test_real_data_of_a_causal_lm_is_windows_of_its_corpus_drawn_seeded(tmp_path):
    tokenizer = minilm_tokenizer()
    corpus = tmp_path / "wiki.valid.raw"
    corpus.write_text(" ".join(str(n) for n in range(400)))  # every window of the stream is a different one
    stream = tokenizer(corpus.read_text())["input_ids"]
    teacher = tiny_teacher("gpt2")

    def draw(seed: int, seq_len: int = 8) -> CalibrationSet:
        calib = CalibConfig(method="real-data", samples=6, seq_len=seq_len, seed=seed, real_data=str(corpus))
        return calibrate(
            CalibrationRequest(teacher, tokenizer, calib, QuantConfig(), TaskConfig(kind="causal-lm"))
        ).samples

    samples = draw(0)
    assert samples.input_ids.shape == (6, 8) and bool(samples.attention_mask.all())
    windows = [stream[i : i + 8] for i in range(0, len(stream) - 7, 8)]
    assert all(row in windows for row in samples.input_ids.tolist())  # whole windows of the stream, as perplexity
    assert len({tuple(row) for row in samples.input_ids.tolist()}) == 6  # drawn without replacement
    assert torch.equal(samples.input_ids, draw(0).input_ids)
    assert not torch.equal(samples.input_ids, draw(1).input_ids)
    with pytest.raises(ConfigError, match=r"calib.real_data: .* fewer than calib.seq_len \(100000\) tokens"):
        draw(0, seq_len=100_000)


def test_quantize_student_restores_a_learned_state_instead_of_initialising_ranges():
    teacher = tiny_teacher("bert")
    quant = QuantConfig(weights=WeightQuant(bits=4))
    batches = _calibrate("random-tokens", teacher).samples.batches(3)
    student, result = quantize_student(teacher, quant, batches, show_progress=False)
    assert not result.losses  # quant.learn.steps is 0: ranges only
    layers = quant_layers(student)
    state = {f"{name}.weight_quantizer.scale": 2 * layer.weight_quantizer.scale for name, layer in layers.items()}
    restored, _ = quantize_student(teacher, quant, [], state, show_progress=False)
    for name, layer in quant_layers(restored).items():
        assert torch.equal(layer.weight_quantizer.scale, 2 * layers[name].weight_quantizer.scale)
