"""Task metrics and agreement measures on numpy outputs."""

from __future__ import annotations

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


def token_nll(logits: np.ndarray, input_ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens."""
    shifted = logits[:, :-1].astype(np.float64)
    targets = input_ids[:, 1:]
    valid = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    top = shifted.max(-1, keepdims=True)
    log_norm = np.log(np.exp(shifted - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(shifted, targets[..., None], -1)[..., 0]
    nll = (log_norm - picked)[valid]
    return float(nll.sum()), int(valid.sum())


def agreement(reference: np.ndarray, candidate: np.ndarray, kind: str) -> dict[str, float]:
    """How closely ``candidate`` reproduces ``reference``: max |diff|, mean cosine, argmax match."""
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cand = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    result = {
        "max_abs_diff": float(np.abs(ref - cand).max()),
        "mean_cosine": float(cosine_rows(ref, cand).mean()),
    }
    if kind != "embedding":
        result["argmax_match"] = float((ref.argmax(-1) == cand.argmax(-1)).mean())
    return result


def fidelity(reference: np.ndarray, candidate: np.ndarray, kind: str) -> float:
    """How faithful ``candidate`` is to ``reference`` (the FP model) on the same inputs: percent of equal
    predictions for classifiers and LMs, 100 x mean cosine for embeddings. A task metric moves both ways as
    predictions flip; fidelity counts every flip."""
    measures = agreement(reference, candidate, kind)
    return 100 * measures.get("argmax_match", measures["mean_cosine"])
