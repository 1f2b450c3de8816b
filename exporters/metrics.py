"""Task metrics and agreement measures on numpy outputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation."""
    ra, rb = average_ranks(np.asarray(a, dtype=np.float64)), average_ranks(np.asarray(b, dtype=np.float64))
    return float(np.corrcoef(ra, rb)[0, 1])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[n, d]`` arrays."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of equal entries."""
    return float((predictions == labels).mean())


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation for binary labels (CoLA)."""
    tp = float(((predictions == 1) & (labels == 1)).sum())
    tn = float(((predictions == 0) & (labels == 0)).sum())
    fp = float(((predictions == 1) & (labels == 0)).sum())
    fn = float(((predictions == 0) & (labels == 1)).sum())
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / den) if den else 0.0


# Rows (token positions) of logits turned to float64 at a time: a decoder's vocabulary makes one row 0.4 MB
# in float64, and a whole batch at once (8 windows x 256 tokens) took gigabytes of temporaries
CHUNK_ROWS = 256


def _row_chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """``array`` as ``[rows, last]`` views, ``CHUNK_ROWS`` rows at a time (a memory-mapped file stays on disk)."""
    rows = array.reshape(-1, array.shape[-1])
    for start in range(0, len(rows), CHUNK_ROWS):
        yield rows[start : start + CHUNK_ROWS]


def token_nll(logits: np.ndarray, input_ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens (in float64, a chunk of
    positions at a time)."""
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    total = 0.0
    for row in range(logits.shape[0]):
        for start in range(0, logits.shape[1] - 1, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, logits.shape[1] - 1)
            shifted = np.asarray(logits[row, start:stop], dtype=np.float64)
            top = shifted.max(-1, keepdims=True)
            log_norm = np.log(np.exp(shifted - top).sum(-1)) + top[..., 0]
            picked = np.take_along_axis(shifted, input_ids[row, start + 1 : stop + 1, None], -1)[..., 0]
            total += float((log_norm - picked)[valid[row, start:stop]].sum())
    return total, int(valid.sum())


@dataclass
class AgreementStream:
    """:func:`agreement` accumulated batch by batch, so that no model's outputs need to be held whole (a
    decoder's logits over an evaluation corpus are gigabytes)."""

    max_abs_diff: float = 0.0
    cosine_sum: float = 0.0
    argmax_matches: int = 0
    rows: int = 0
    width: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> AgreementStream:
        """One batch of outputs (any shape with the same last axis)."""
        for ref, cand in zip(_row_chunks(reference), _row_chunks(candidate)):
            ref, cand = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
            self.max_abs_diff = max(self.max_abs_diff, float(np.abs(ref - cand).max()))
            self.cosine_sum += float(cosine_rows(ref, cand).sum())
            self.argmax_matches += int((ref.argmax(-1) == cand.argmax(-1)).sum())
            self.rows += len(ref)
            self.width = ref.shape[-1]
        return self

    def result(self, kind: str) -> dict[str, float]:
        """max |diff|, mean cosine and (except for embeddings and one-output regression heads, where no argmax
        means anything) the argmax match rate."""
        result = {"max_abs_diff": self.max_abs_diff, "mean_cosine": self.cosine_sum / max(self.rows, 1)}
        if kind != "embedding" and self.width > 1:
            result["argmax_match"] = self.argmax_matches / max(self.rows, 1)
        return result


def agreement(reference: np.ndarray, candidate: np.ndarray, kind: str) -> dict[str, float]:
    """How closely ``candidate`` reproduces ``reference``: max |diff|, mean cosine, argmax match."""
    return AgreementStream().add(reference, candidate).result(kind)


def fidelity(reference: np.ndarray, candidate: np.ndarray, kind: str) -> float:
    """How faithful ``candidate`` is to ``reference`` (the FP model) on the same inputs: percent of equal
    predictions for classifiers and LMs, 100 x mean cosine for embeddings. A task metric moves both ways as
    predictions flip; fidelity counts every flip. A regression head (one output): 100 x the Pearson correlation
    of the two models' scores."""
    if reference.shape[-1] == 1:
        return 100 * float(np.corrcoef(reference.ravel(), candidate.ravel())[0, 1])
    measures = agreement(reference, candidate, kind)
    return 100 * measures.get("argmax_match", measures["mean_cosine"])
