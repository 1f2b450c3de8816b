"""The inputs of the methods without a generator: shapes, what they avoid, and who may use them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from calib.generators import embedding_table
from pipeline.config import CalibConfig, ModelSource, PipelineConfig, TaskConfig
from pipeline.errors import ConfigError
from pipeline.stages.calibrate import baseline_inputs
from tests.models import tiny_teacher

BASE = PipelineConfig(model=ModelSource(id="tiny"), calib=CalibConfig(samples=6, seq_len=12, seed=3))


def _config(method: str, kind: str = "classification") -> PipelineConfig:
    return replace(BASE, calib=replace(BASE.calib, method=method), task=TaskConfig(kind=kind))


def test_random_tokens_and_gaussian_embeds_have_the_configured_shape_and_vary_in_length():
    teacher = tiny_teacher("bert")
    tokens = baseline_inputs(_config("random-tokens"), teacher, None)
    assert tokens.input_ids.shape == (6, 12) and tokens.inputs_embeds is None
    embeds = baseline_inputs(_config("gaussian-embeds"), teacher, None)
    table = embedding_table(teacher)
    assert embeds.inputs_embeds.shape == (6, 12, table.shape[1]) and embeds.input_ids is None
    assert len(set(embeds.attention_mask.sum(1).tolist())) > 1
    padded = embeds.inputs_embeds[embeds.attention_mask == 0]
    assert torch.all(padded == 0)  # padding positions carry no signal


def test_teacher_sampled_text_comes_from_a_causal_lm_only():
    sampled = baseline_inputs(_config("teacher-sampled", "causal-lm"), tiny_teacher("gpt2"), None)
    assert sampled.input_ids.shape == (6, 12) and bool(sampled.attention_mask.all())
    again = baseline_inputs(_config("teacher-sampled", "causal-lm"), tiny_teacher("gpt2"), None)
    assert torch.equal(sampled.input_ids, again.input_ids)  # seeded
    with pytest.raises(ConfigError, match="teacher-sampled needs a causal-LM teacher"):
        baseline_inputs(_config("teacher-sampled"), tiny_teacher("bert"), None)


def test_real_data_needs_a_tokenizer():
    teacher = tiny_teacher("bert")
    with pytest.raises(ConfigError, match="no tokenizer"):
        baseline_inputs(_config("real-data"), teacher, None)
