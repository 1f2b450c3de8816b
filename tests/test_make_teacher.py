"""scripts/make_teacher.py: fine-tunes a (tiny) base on SST-2 once, saves a complete teacher, then serves the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.models import save_tiny_bert_folder
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # beside the clone, as in CI
WORDS = ("the", "a", "movie", "film", "good", "bad", "great", "not", "is", "it", "and", ",", ".")
needs_data = pytest.mark.skipif(not (DATA / "glue" / "SST-2").is_dir(), reason=f"no GLUE data at {DATA}")


make_teacher = load_script("make_teacher")


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    """A random 1-layer BERT with a small word vocabulary, saved as a model folder."""
    return save_tiny_bert_folder(tmp_path / "tiny-bert", WORDS)


def _run(*args: object):
    return CliRunner().invoke(make_teacher.main, [str(a) for a in args])


@needs_data
def test_fine_tunes_once_then_serves_the_cache(tiny_base, tmp_path):
    out = tmp_path / "teacher"

    def make(folder: Path, *extra: object):
        common = ("--base", tiny_base, "--data-dir", DATA, "--max-train", 300, "--seq-len", 32, "--batch-size", 32)
        return _run("--task", "sst2", "--out", folder, *common, *extra)

    first = make(out)
    assert first.exit_code == 0, first.output
    assert "fine-tune" in first.output  # the progress bar
    assert {"config.json", "model.safetensors", "tokenizer.json", "teacher.json"} <= {p.name for p in out.iterdir()}
    assert not (tmp_path / ".tmp-teacher").exists()
    info = json.loads((out / "teacher.json").read_text(encoding="utf-8"))
    assert info["metric"] == "accuracy" and 0.0 <= info["value"] <= 100.0
    assert info["train_examples"] == 300 and info["settings"]["max_train"] == 300
    assert info["settings"]["base"] == str(tiny_base)
    weights = out / "model.safetensors"
    made = weights.stat().st_mtime_ns

    again = make(out)
    assert again.exit_code == 0, again.output
    assert f"cached teacher at {out}: dev accuracy {info['value']:.2f}" in again.output
    assert "fine-tune" not in again.output and weights.stat().st_mtime_ns == made

    twin = make(tmp_path / "twin")  # the same settings elsewhere: the same weights
    assert twin.exit_code == 0, twin.output
    assert (tmp_path / "twin" / "model.safetensors").read_bytes() == weights.read_bytes()

    other_seed = make(out, "--seed", 1)  # other settings: trained anew and replaced
    assert other_seed.exit_code == 0, other_seed.output
    assert json.loads((out / "teacher.json").read_text(encoding="utf-8"))["settings"]["seed"] == 1
    assert weights.read_bytes() != (tmp_path / "twin" / "model.safetensors").read_bytes()


def test_a_folder_that_is_not_a_teacher_is_never_replaced(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    result = _run("--task", "sst2", "--out", out, "--base", "no_such_package/model")
    assert result.exit_code == 1 and f"{out} is a folder without teacher.json: not replacing it" in result.output
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_missing_data_dir_is_one_clear_error(tiny_base, tmp_path):
    result = _run("--task", "rte", "--out", tmp_path / "t", "--base", tiny_base, "--data-dir", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert f"Error: no RTE train data at {tmp_path / 'nowhere' / 'glue' / 'RTE' / 'train.tsv'}" in result.output
    assert not (tmp_path / "t").exists()


def test_missing_package_and_unknown_task_are_refused(tmp_path):
    result = _run("--task", "sst2", "--out", tmp_path / "t", "--base", "no_such_package/model")
    assert result.exit_code == 1
    assert "--base no_such_package/model: model.package: no installed Python package 'no_such_package'" in result.output
    unknown = _run("--task", "mnli", "--out", tmp_path / "t")
    assert unknown.exit_code == 2 and "'mnli' is not one of" in unknown.output
