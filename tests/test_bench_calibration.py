"""scripts/bench_calibration.py: fidelity to FP per task kind, and the command line's overrides."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import CalibConfig, LearnConfig, ModelSource, PipelineConfig, QuantConfig, SamSgaConfig
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
