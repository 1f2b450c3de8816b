"""Task evaluation data (GLUE dev TSVs, WikiText-2) read into token batches. Used by validation only."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

LABELS = {"entailment": 0, "not_entailment": 1}
# (first text column, second text column or None, label column) by the header's column names.
PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"))


@dataclass
class EvalSet:
    """Texts (one or two per example) and targets; ``texts_b`` is empty for single-sentence tasks."""

    texts_a: list[str]
    texts_b: list[str] = field(default_factory=list)
    targets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    corpus: str = ""


def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def load_eval_set(path: Path, metric: str, limit: int | None) -> EvalSet:
    """Read a GLUE dev file (SST-2, CoLA, STS-B, RTE, QNLI) or a raw text corpus (perplexity)."""
    if metric == "perplexity":
        return EvalSet(texts_a=[], corpus=path.read_text(encoding="utf-8"))
    rows = _read_tsv(path)
    if not rows:
        raise ConfigError(f"task.eval.data: {path} is empty")
    header = rows[0]
    if "label" not in header and "score" not in header:  # CoLA: no header; label in column 1, text in 3
        rows = rows[:limit] if limit else rows
        return EvalSet([r[3] for r in rows], targets=np.array([int(r[1]) for r in rows]))
    body = [r for r in rows[1:] if len(r) == len(header)]
    body = body[:limit] if limit else body
    column = {name: i for i, name in enumerate(header)}
    target_name = "score" if "score" in column else "label"
    raw_targets = [r[column[target_name]] for r in body]
    if target_name == "score":
        targets = np.array([float(t) for t in raw_targets])
    else:
        targets = np.array([LABELS[t] if t in LABELS else int(t) for t in raw_targets])
    for first, second in PAIR_COLUMNS:
        if first in column and second in column:
            return EvalSet([r[column[first]] for r in body], [r[column[second]] for r in body], targets)
    if "sentence" not in column:
        raise ConfigError(f"task.eval.data: {path} has no sentence column (header: {', '.join(header)})")
    return EvalSet([r[column["sentence"]] for r in body], targets=targets)
