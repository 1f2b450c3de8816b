"""Task data files (GLUE TSVs, WikiText-2): read by validation to score models, by the flagged ``real-data``
calibration method (an upper bound for benchmarks), and by teacher fine-tuning. Never by data-free calibration."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from calib.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from calib.config import CalibConfig
    from calib.methods import Calibration, CalibrationRequest

REAL_DATA_FLAG = "uses REAL TASK DATA: an upper bound for benchmarks, not a data-free result"

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
    """Read a GLUE dev file (SST-2, CoLA, STS-B, RTE, QNLI) or a raw text corpus (perplexity); a file of
    another shape is a one-line :class:`ConfigError` naming it."""
    if metric == "perplexity":
        return EvalSet(texts_a=[], corpus=path.read_text(encoding="utf-8"))
    try:
        return _glue_set(_read_tsv(path), limit)
    except (IndexError, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{path}: not a GLUE task file (expected a header naming label or score and the sentence columns, "
            f"or CoLA's four headerless columns): {exc}"
        ) from None


def _glue_set(rows: list[list[str]], limit: int | None) -> EvalSet:
    if not rows:
        raise ValueError("the file is empty")
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
        raise ValueError(f"no sentence column (header: {', '.join(header)})")
    return EvalSet([r[column["sentence"]] for r in body], targets=targets)


def real_data_inputs(request: CalibrationRequest) -> Calibration:
    """The ``real-data`` method: ``calib.samples`` examples drawn (seeded) from the task file ``calib.real_data``,
    tokenized as the model reads them: sentence pairs together for a classifier, each sentence alone for an
    embedding model; for a causal LM, windows of a raw text corpus."""
    import torch

    from calib.inputs import CalibrationSet
    from calib.methods import Calibration

    calib, tokenizer = request.calib, request.tokenizer
    if tokenizer is None:
        raise ConfigError("calib.real_data: the model has no tokenizer to read task text")
    path = Path(calib.real_data)
    if not path.is_file():
        raise ConfigError(f"calib.real_data: no file at {path}")
    if request.task.kind == "causal-lm":
        return _drawn_corpus_windows(path, tokenizer, calib)
    data = load_eval_set(path, "accuracy", None)
    pairs = bool(data.texts_b) and request.task.kind != "embedding"
    texts = data.texts_a if pairs or not data.texts_b else data.texts_a + data.texts_b
    generator = torch.Generator().manual_seed(calib.seed)
    picked = torch.randperm(len(texts), generator=generator)[: calib.samples].tolist()
    enc = tokenizer(
        [texts[i] for i in picked], [data.texts_b[i] for i in picked] if pairs else None,
        padding="max_length", truncation=True, max_length=calib.seq_len, return_tensors="pt",
    )  # fmt: skip
    return Calibration(CalibrationSet(enc["attention_mask"].long(), input_ids=enc["input_ids"].long()))


def token_windows(
    tokenizer: PreTrainedTokenizerBase, corpus: str, seq_len: int, limit: int | None = None
) -> np.ndarray:
    """``corpus`` tokenized as one stream and cut into non-overlapping ``seq_len``-token windows ``[n, seq_len]``
    (int64), the first ``limit`` of them when given: how perplexity reads a corpus, and how real data is drawn."""
    ids = np.asarray(tokenizer(corpus)["input_ids"], dtype=np.int64)
    count = len(ids) // seq_len
    count = min(count, limit) if limit else count
    return ids[: count * seq_len].reshape(count, seq_len)


def _drawn_corpus_windows(path: Path, tokenizer: PreTrainedTokenizerBase, calib: CalibConfig) -> Calibration:
    """A causal LM's real data: the corpus (e.g. WikiText-2's validation split) in windows of ``calib.seq_len``
    tokens, as perplexity reads its test split (:func:`token_windows`); ``calib.samples`` of them drawn (seeded)."""
    import torch

    from calib.inputs import CalibrationSet
    from calib.methods import Calibration

    windows = torch.from_numpy(token_windows(tokenizer, path.read_text(encoding="utf-8"), calib.seq_len))
    if len(windows) == 0:
        raise ConfigError(f"calib.real_data: {path} holds fewer than calib.seq_len ({calib.seq_len}) tokens")
    picked = torch.randperm(len(windows), generator=torch.Generator().manual_seed(calib.seed))[: calib.samples]
    rows = windows[picked]
    return Calibration(CalibrationSet(torch.ones_like(rows), input_ids=rows))
