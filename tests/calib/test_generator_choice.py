"""``calib.generator.kind: auto``: the lm-adapter wherever its LM is there, soft tokens with a notice where not;
an explicit lm-adapter never falls back."""

from __future__ import annotations

import pytest

from calib import generator_choice
from calib.errors import ConfigError
from calib.generator_choice import DEFAULT_LM, DEFAULT_LM_INSTALL
from pipeline.config import parse_config, settle_generator

ENCODER = {"model": {"path": "teacher"}, "task": {"kind": "embedding"}}


def _settled(raw, tmp_path=None):
    return settle_generator(parse_config(raw, base_dir=tmp_path))


def _installed(monkeypatch, installed: bool) -> None:
    monkeypatch.setattr(generator_choice, "default_lm_installed", lambda: installed)


def test_auto_is_the_lm_adapter_over_the_default_lm_where_it_is_installed(monkeypatch, tmp_path):
    _installed(monkeypatch, True)
    assert parse_config(ENCODER, base_dir=tmp_path).calib.generator.kind == "auto"  # settled at run time
    config, notice = _settled(ENCODER, tmp_path)
    assert config.calib.generator.kind == "lm-adapter" and config.calib.generator.model == DEFAULT_LM
    assert notice is None


def test_auto_falls_back_to_soft_tokens_with_a_one_line_notice(monkeypatch, tmp_path):
    _installed(monkeypatch, False)
    config, notice = _settled(ENCODER, tmp_path)
    assert config.calib.generator.kind == "soft-tokens" and config.calib.generator.model is None
    assert notice.startswith("calib.generator:") and DEFAULT_LM_INSTALL in notice and "\n" not in notice
    assert _settled({**ENCODER, "calib": {"method": "random-tokens"}}, tmp_path)[1] is None  # no ZSAQ, no notice


def test_the_run_command_shows_the_notice_once_on_stderr(monkeypatch, tmp_path, cli, write_config):
    _installed(monkeypatch, False)
    monkeypatch.setattr("pipeline.config.resolve_generator", _as_if_readable(generator_choice.resolve_generator))
    zsaq = {"calib": {"method": "zsaq", "samples": 8, "seq_len": 16, "sam_sga": {"rounds": 2}}}
    result = cli("run", write_config(zsaq), "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    notices = [line for line in result.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and DEFAULT_LM_INSTALL in notices[0]


def _as_if_readable(resolve):
    """The resolver, told that the tiny random teacher had a tokenizer (as a real model does)."""
    return lambda gen, kind, readable: resolve(gen, kind, True)


def test_a_causal_teacher_writes_its_own_text_and_a_random_model_gets_soft_tokens(monkeypatch):
    _installed(monkeypatch, False)
    decoder, notice = _settled({"model": {"random": {"family": "llama"}}, "task": {"kind": "causal-lm"}})
    assert decoder.calib.generator.kind == "lm-adapter" and decoder.calib.generator.model is None and notice is None
    encoder, notice = _settled({"model": {"random": {"family": "bert"}}, "task": {"kind": "embedding"}})
    assert encoder.calib.generator.kind == "soft-tokens" and notice is None  # no tokenizer to read another LM's text


def test_an_explicit_lm_adapter_never_falls_back(monkeypatch, tmp_path):
    _installed(monkeypatch, False)
    with pytest.raises(ConfigError) as error:
        parse_config({**ENCODER, "calib": {"generator": {"kind": "lm-adapter"}}}, base_dir=tmp_path)
    message = str(error.value)
    assert "calib.generator.model" in message and DEFAULT_LM_INSTALL in message and "\n" not in message
    _installed(monkeypatch, True)
    with pytest.raises(ConfigError, match="a random model has no tokenizer"):
        parse_config({"model": {"random": {"family": "bert"}}, "calib": {"generator": {"kind": "lm-adapter"}}})


def test_a_named_generator_model_and_soft_tokens_stay_as_written(monkeypatch, tmp_path):
    _installed(monkeypatch, True)
    named = {"kind": "auto", "model": {"package": "other_lm/model"}}
    config = _settled({**ENCODER, "calib": {"generator": named}}, tmp_path)[0]
    assert config.calib.generator.kind == "lm-adapter" and config.calib.generator.model.package == "other_lm/model"
    config = _settled({**ENCODER, "calib": {"generator": {"kind": "soft-tokens"}}}, tmp_path)[0]
    assert config.calib.generator.kind == "soft-tokens" and config.calib.generator.model is None
