"""scripts/choose_setting.py: a row's student learned at each value of one setting on every task, scored on
held-out inputs, the value with the best geometric mean relative to each task's best chosen, both records written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from calib.inputs import Batch, random_tokens
from tests.models import save_tiny_bert_folder
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
choose_setting = load_script("choose_setting")


def test_the_choice_is_the_best_geometric_mean_relative_to_each_tasks_best():
    losses = {"a": {1e-4: 2.0, 1e-3: 1.0, 1e-2: 4.0}, "b": {1e-4: 10.0, 1e-3: 30.0, 1e-2: 90.0}}
    chosen, scores = choose_setting.choose(losses)
    assert scores[1e-4] == pytest.approx(math.sqrt(2.0 * 1.0))  # 2x a's best, b's best
    assert scores[1e-3] == pytest.approx(math.sqrt(1.0 * 3.0))
    assert chosen == 1e-4
    assert choose_setting.choose({"a": {1e-4: -1e-9, 1e-3: 1.0}})[0] == 1e-4  # a KL rounded below 0


def test_a_dotted_key_is_a_nested_patch():
    assert choose_setting.setting_patch("calib.sam_sga.rho", 0.01) == {"calib": {"sam_sga": {"rho": 0.01}}}


def _tiny_spec(tmp_path: Path, rows: list[str]) -> Path:
    """A two-task spec over one tiny BERT folder."""
    model = save_tiny_bert_folder(tmp_path / "tiny-bert", ("good", "bad", "movie", "not", "fun"))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood movie\t1\nbad movie\t0\n", encoding="utf-8")
    config = {
        "model": {"path": str(model)},
        "task": {"kind": "classification", "eval": {"data": "dev.tsv", "metric": "accuracy"}},
        "calib": {"samples": 8, "seq_len": 8, "generator": {"batch_size": 4, "min_len": 4}, "sam_sga": {"rounds": 3}},
    }
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    spec = {
        "catalogue": str(ROOT / "bench" / "rows.yaml"),
        "config": {"quant": {"learn": {"params": ["step-sizes", "weights"]}}},
        "tasks": {"one": {"config": "task.yaml"}, "two": {"config": "task.yaml"}},
        "rows": rows,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return tmp_path / "spec.yaml"


@pytest.fixture
def held_out(monkeypatch):
    """Held-out inputs without the generator LM."""
    tokens = random_tokens(8, 8, 10, seed=1)
    batches = [Batch(b.attention_mask, input_ids=b.input_ids) for b in tokens.batches(4)]
    monkeypatch.setattr(choose_setting, "default_lm_installed", lambda: True)
    monkeypatch.setattr(choose_setting, "held_out_text", lambda *_: batches)


def test_every_rate_learns_a_student_per_task_and_the_records_say_which_won(tmp_path, held_out):
    out = tmp_path / "weights_lr.md"
    args = ["--spec", _tiny_spec(tmp_path, ["qat-random-w2a8"]), "--values", "1e-4", "--values", "1", "--out", out]
    result = CliRunner().invoke(choose_setting.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["key"] == "quant.learn.weights_lr"
    assert set(record["losses"]) == {"one", "two"} and all(len(by) == 2 for by in record["losses"].values())
    losses = record["losses"]["one"]
    assert losses["0.0001"] != losses["1.0"]  # the rate reached the weights
    assert record["chosen"] == min((1e-4, 1.0), key=lambda r: losses[str(r)])  # the same tasks: the lower loss
    assert f"Chosen: **{record['chosen']:g}**." in out.read_text()


def test_another_key_reaches_the_game_and_a_key_the_config_lacks_is_one_line(tmp_path, held_out):
    spec = _tiny_spec(tmp_path, ["zsaq-soft-w2a8"])
    out = tmp_path / "rho.md"
    rho = ["--key", "calib.sam_sga.rho", "--values", "1e-3", "--values", "0.5"]
    args = ["--spec", spec, "--row", "zsaq-soft-w2a8", *rho, "--out", out]
    result = CliRunner().invoke(choose_setting.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["key"] == "calib.sam_sga.rho"
    assert record["losses"]["one"]["0.001"] != record["losses"]["one"]["0.5"]  # rho reached the student's SAM steps
    assert "--key calib.sam_sga.rho --values 0.001 --values 0.5" in out.read_text()
    bad = ["--spec", spec, "--row", "zsaq-soft-w2a8", "--key", "calib.sam_sga.rhoo", "--out", tmp_path / "bad.md"]
    result = CliRunner().invoke(choose_setting.main, [str(a) for a in bad])
    assert result.exit_code == 1 and "rhoo" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad.md").exists()
