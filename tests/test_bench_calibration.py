"""scripts/bench_calibration.py: fidelity to FP per task kind, the command line's overrides, the flagged
real-data upper bound."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.config import (
    CalibConfig,
    EvalData,
    LearnConfig,
    ModelSource,
    PipelineConfig,
    QuantConfig,
    SamSgaConfig,
    TaskConfig,
)
from tests.scripts import load_script

bench = load_script("bench_calibration")


def test_fidelity_counts_every_flip_for_classifiers_and_cosine_for_embeddings():
    fp = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    flipped_both_ways = np.array([[0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    assert bench.fidelity_to_fp(fp, flipped_both_ways, "classification") == pytest.approx(50.0)
    embeddings = np.array([[1.0, 0.0], [1.0, 1.0]])
    turned = np.array([[1.0, 1.0], [2.0, 2.0]])  # 45 degrees off, then the same direction
    expected = 100 * (np.sqrt(0.5) + 1.0) / 2
    assert bench.fidelity_to_fp(embeddings, turned, "embedding") == pytest.approx(expected)


def test_overrides_set_the_budget_and_add_the_weights_at_their_own_rate():
    config = PipelineConfig(
        model=ModelSource(id="unused"),
        calib=CalibConfig(sam_sga=SamSgaConfig(rounds=60)),
        quant=QuantConfig(learn=LearnConfig(lr=0.01, params=("step-sizes",))),
    )
    assert bench.with_overrides(config, None, None) == config
    changed = bench.with_overrides(config, 180, 0.001)
    assert changed.calib.sam_sga.rounds == 180
    assert changed.quant.learn.params == ("step-sizes", "weights") and changed.quant.learn.weights_lr == 0.001
    assert changed.quant.learn.lr == 0.01
    assert bench.learnable(changed) == "step-sizes, weights (rate 0.001)"
    assert bench.with_overrides(config, None, None, frozen_generator=True).calib.sam_sga.adversarial is False


def test_the_real_data_upper_bound_needs_its_file_and_every_row_says_what_ran(tmp_path):
    config_file = tmp_path / "bench.yaml"
    config_file.write_text("model: {id: unused}\n")
    arguments = [str(config_file), "--methods", "real-data", "--out", str(tmp_path / "t.md")]
    result = CliRunner().invoke(bench.main, arguments)
    assert result.exit_code == 2 and "--real-data FILE" in result.output
    assert not (tmp_path / "t.md").exists()
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\nfine\t1\n")
    config = PipelineConfig(model=ModelSource(id="unused"))
    assert bench.with_overrides(config, None, None, train).calib.real_data == str(train.resolve())
    assert "real-data" not in bench.DATA_FREE
    scored = dataclasses.replace(
        config, task=TaskConfig(kind="classification", eval=EvalData(data=str(train), metric="accuracy"))
    )
    runs = [{"bits": 4, "method": m, "seed": 0, "metric": 80.0, "fidelity": 90.0, "minutes": 0.5}
            for m in ("zsaq", "random-tokens", "real-data")]  # fmt: skip
    bench.write_table(tmp_path / "t.md", bench.with_overrides(scored, None, None, frozen_generator=True), 86.0, runs)
    rows = (tmp_path / "t.md").read_text().splitlines()
    assert rows[3].startswith("| zsaq (soft-tokens), generator frozen (adversarial: false) |")
    assert rows[4].startswith("| random-tokens |") and rows[5].startswith(f"| {bench.UPPER_BOUND} |")
    assert "upper bound" in rows[5]
