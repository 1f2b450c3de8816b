"""Metrics that stream: chunked perplexity and agreement equal the whole-array formulas, and a reference model's
outputs kept on disk read back as they were written."""

from __future__ import annotations

import numpy as np

from exporters.metrics import CHUNK_ROWS, AgreementStream, cosine_rows, token_nll
from exporters.validation import SpilledArrays


def _logits(rng: np.random.Generator, batch: int, tokens: int, vocab: int = 40) -> np.ndarray:
    return rng.standard_normal((batch, tokens, vocab)).astype(np.float32)


def test_chunked_token_nll_is_the_whole_array_formula():
    rng = np.random.default_rng(0)
    tokens = 2 * CHUNK_ROWS + 37  # several chunks per row, the last one short
    logits, ids = _logits(rng, 3, tokens), rng.integers(0, 40, (3, tokens))
    mask = np.ones((3, tokens), dtype=np.int64)
    mask[1, 300:] = 0  # a padded row
    shifted = logits[:, :-1].astype(np.float64)
    log_norm = np.log(np.exp(shifted).sum(-1))
    picked = np.take_along_axis(shifted, ids[:, 1:, None], -1)[..., 0]
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    nll, count = token_nll(logits, ids, mask)
    assert count == int(valid.sum()) == 2 * (tokens - 1) + 299
    np.testing.assert_allclose(nll, float((log_norm - picked)[valid].sum()), rtol=1e-12)


def test_chunked_agreement_is_the_whole_array_formula():
    rng = np.random.default_rng(1)
    ref = _logits(rng, 2, CHUNK_ROWS + 10)
    cand = ref + 0.1 * _logits(rng, 2, CHUNK_ROWS + 10)
    got = AgreementStream().add(ref, cand).result("causal-lm")
    r, c = ref.reshape(-1, 40).astype(np.float64), cand.reshape(-1, 40).astype(np.float64)
    assert got["max_abs_diff"] == float(np.abs(r - c).max())
    np.testing.assert_allclose(got["mean_cosine"], cosine_rows(r, c).mean(), rtol=1e-12)
    assert got["argmax_match"] == float((r.argmax(-1) == c.argmax(-1)).mean())


def test_spilled_arrays_come_back_from_disk_as_written():
    rng = np.random.default_rng(2)
    spilled = SpilledArrays()
    arrays = [_logits(rng, 2, 5), _logits(rng, 1, 7)]
    for array in arrays:
        spilled.append(array)
    assert len(spilled) == 2
    for i, array in enumerate(arrays):
        back = spilled[i]
        assert isinstance(back, np.memmap)  # read from the file, not held in memory
        np.testing.assert_array_equal(back, array)


def test_a_regression_heads_agreement_has_no_argmax_match():
    scores = np.array([[0.1], [0.9]])
    assert "argmax_match" not in AgreementStream().add(scores, scores).result("classification")
    logits = np.array([[0.1, 0.2], [0.9, 0.0]])
    assert AgreementStream().add(logits, logits).result("classification")["argmax_match"] == 1.0
