"""scripts/choose_weights_lr.py: a row's student learned at each rate on every task, scored on held-out inputs,
the rate with the best geometric mean relative to each task's best chosen, both records written."""

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
choose_weights_lr = load_script("choose_weights_lr")


def test_the_choice_is_the_best_geometric_mean_relative_to_each_tasks_best():
    losses = {"a": {1e-4: 2.0, 1e-3: 1.0, 1e-2: 4.0}, "b": {1e-4: 10.0, 1e-3: 30.0, 1e-2: 90.0}}
    chosen, scores = choose_weights_lr.choose(losses)
    assert scores[1e-4] == pytest.approx(math.sqrt(2.0 * 1.0))  # 2x a's best, b's best
    assert scores[1e-3] == pytest.approx(math.sqrt(1.0 * 3.0))
    assert chosen == 1e-4
    assert choose_weights_lr.choose({"a": {1e-4: -1e-9, 1e-3: 1.0}})[0] == 1e-4  # a KL rounded below 0


def test_every_rate_learns_a_student_per_task_and_the_records_say_which_won(tmp_path, monkeypatch):
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
        "rows": ["qat-random-w2a8"],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    tokens = random_tokens(8, 8, 10, seed=1)  # held-out inputs without the generator LM
    held_out = [Batch(b.attention_mask, input_ids=b.input_ids) for b in tokens.batches(4)]
    monkeypatch.setattr(choose_weights_lr, "default_lm_installed", lambda: True)
    monkeypatch.setattr(choose_weights_lr, "held_out_text", lambda *_: held_out)
    out = tmp_path / "weights_lr.md"
    args = ["--spec", tmp_path / "spec.yaml", "--rates", "1e-4", "--rates", "1", "--out", out]
    result = CliRunner().invoke(choose_weights_lr.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert set(record["losses"]) == {"one", "two"} and all(len(by) == 2 for by in record["losses"].values())
    losses = record["losses"]["one"]
    assert losses["0.0001"] != losses["1.0"]  # the rate reached the weights
    assert record["chosen"] == min((1e-4, 1.0), key=lambda r: losses[str(r)])  # the same tasks: the lower loss
    assert f"Chosen: **{record['chosen']:g}**." in out.read_text()
