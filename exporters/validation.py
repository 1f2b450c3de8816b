"""Validation: every model on the same inputs: task metric, agreement with the PyTorch student, latency, size."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from calib.config import TaskConfig
from calib.inputs import random_tokens
from calib.models import TaskModel
from calib.task_data import EvalSet, load_eval_set, token_windows
from exporters.config import ValidateConfig
from exporters.metrics import AgreementStream, accuracy, cosine_rows, matthews, spearman, token_nll
from exporters.runners import Latency, OrtRunner, Runner, TorchRunner, measure_latencies

EVAL_BATCH = 32
# Evaluation windows per call of a causal LM: its logits are windows x tokens x vocabulary floats (SmolLM2:
# 2 x 256 x 49,152 = 100 MB); more per call buys no speed on a CPU and held the validate stage over 6 GiB
WINDOW_BATCH = 2
GENERATED_SEED_OFFSET = 1000  # generated validation inputs never coincide with calibration inputs


@dataclass
class EvalInputs:
    """Token batches to run (one list per text column) and what the metric needs besides outputs."""

    batches_a: list[tuple[np.ndarray, np.ndarray]]
    batches_b: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    targets: np.ndarray | None = None
    metric: str | None = None
    source: str = ""


def _tokenize(tokenizer: PreTrainedTokenizerBase, a: list[str], b: list[str] | None, max_len: int) -> list:
    batches = []
    for i in range(0, len(a), EVAL_BATCH):
        enc = tokenizer(
            a[i : i + EVAL_BATCH],
            b[i : i + EVAL_BATCH] if b else None,
            padding="longest",
            truncation=True,
            max_length=max_len,
            return_tensors="np",
        )
        batches.append((enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)))
    return batches


def _corpus_windows(tokenizer: PreTrainedTokenizerBase, corpus: str, seq_len: int, limit: int | None) -> list:
    rows = token_windows(tokenizer, corpus, seq_len, limit)
    step = WINDOW_BATCH
    return [(rows[i : i + step], np.ones_like(rows[i : i + step])) for i in range(0, len(rows), step)]


def build_eval_inputs(
    task: TaskConfig, validate: ValidateConfig, seed: int, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int
) -> tuple[EvalInputs, str | None]:
    """Task data where the config names some and it exists; generated inputs otherwise (with the reason),
    seeded apart from calibration's ``seed``."""
    seq_len = max(s for _, s in validate.shapes)
    spec = task.eval
    reason = None
    if spec is None:
        reason = "the config names no evaluation data"
    elif not Path(spec.data).is_file():
        reason = f"evaluation data {spec.data} is not there"
    elif tokenizer is None:
        reason = "the model has no tokenizer to read evaluation text"
    if reason is None:
        data: EvalSet = load_eval_set(Path(spec.data), spec.metric, spec.limit)
        if spec.metric == "perplexity":
            batches = _corpus_windows(tokenizer, data.corpus, seq_len, spec.limit)
            return EvalInputs(batches, metric="perplexity", source=spec.data), None
        if task.kind == "embedding":
            return EvalInputs(
                _tokenize(tokenizer, data.texts_a, None, seq_len),
                _tokenize(tokenizer, data.texts_b, None, seq_len) if data.texts_b else [],
                data.targets,
                spec.metric,
                spec.data,
            ), None
        batches = _tokenize(tokenizer, data.texts_a, data.texts_b or None, seq_len)
        return EvalInputs(batches, targets=data.targets, metric=spec.metric, source=spec.data), None
    tokens = random_tokens(validate.samples, seq_len, vocab_size, seed + GENERATED_SEED_OFFSET)
    batches = [(b.input_ids.numpy(), b.attention_mask.numpy()) for b in tokens.batches(EVAL_BATCH)]
    return EvalInputs(batches, source="generated random tokens"), reason


def _run_all(runner: Runner, batches: list) -> list[np.ndarray]:
    return [runner(ids, mask) for ids, mask in batches]


@dataclass
class _NllSum:
    """Token negative log-likelihood summed batch by batch; its perplexity."""

    nll: float = 0.0
    count: int = 0

    def add(self, logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> None:
        batch_nll, batch_count = token_nll(logits, ids, mask)
        self.nll, self.count = self.nll + batch_nll, self.count + batch_count

    def perplexity(self) -> float:
        return float(np.exp(self.nll / max(self.count, 1)))


def task_metric(inputs: EvalInputs, outputs_a: list[np.ndarray], outputs_b: list[np.ndarray]) -> float | None:
    """The configured task metric (x100 where it is a fraction or correlation); None without task data."""
    if inputs.metric is None:
        return None
    if inputs.metric == "perplexity":
        total = _NllSum()
        for (ids, mask), logits in zip(inputs.batches_a, outputs_a):
            total.add(logits, ids, mask)
        return total.perplexity()
    a = np.concatenate(outputs_a)
    if inputs.metric == "spearman":
        scores = cosine_rows(a, np.concatenate(outputs_b)) if outputs_b else a[:, 0]
        return 100.0 * spearman(scores, inputs.targets)
    predictions = a.argmax(-1)
    if inputs.metric == "matthews":
        return 100.0 * matthews(predictions, inputs.targets)
    return 100.0 * accuracy(predictions, inputs.targets)


@dataclass
class ModelReport:
    """Everything validation measured for one model."""

    name: str
    runtime: str
    size_mb: float
    metric: float | None
    agreement: dict[str, float] | None
    latency: list[dict[str, Any]]
    reference: str  # what the agreement figures compare with


class SpilledArrays:
    """Arrays written to a temporary folder as they come and read back memory-mapped: a reference model's outputs
    stay on disk, not in memory (a decoder's logits: 8 windows x 256 tokens x 49,152 floats are 400 MB)."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="zsaq-validate-")  # removed with this object
        self._count = 0

    def append(self, array: np.ndarray) -> None:
        np.save(Path(self._folder.name) / f"{self._count}.npy", array)
        self._count += 1

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._count:
            raise IndexError(index)
        return np.load(Path(self._folder.name) / f"{index}.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self._count


@dataclass
class _Outputs:
    """What validation keeps of one model's run: its task metric, its agreement, and its outputs (on disk) only
    when other models are compared with it."""

    metric: float | None
    agreement: dict[str, float] | None
    kept: SpilledArrays | None


def _run_streaming(runner: Runner, inputs: EvalInputs, reference: SpilledArrays | None, kind: str, keep: bool):
    """Run one model batch by batch: perplexity and agreement accumulate as it goes, so a decoder's logits are
    never all in memory; only a reference model's outputs are kept, on disk."""
    stream = AgreementStream() if reference is not None else None
    kept = SpilledArrays() if keep else None
    outs_a: list[np.ndarray] = []  # for metrics over all rows (accuracy, correlation): small outputs
    total = _NllSum()
    for i, (ids, mask) in enumerate(inputs.batches_a):
        output = runner(ids, mask)
        if stream is not None:
            stream.add(reference[i], output)
        if kept is not None:
            kept.append(output)
        if inputs.metric == "perplexity":
            total.add(output, ids, mask)
        elif inputs.metric is not None:
            outs_a.append(output)
    if inputs.metric == "perplexity":
        metric = total.perplexity()
    else:
        metric = task_metric(inputs, outs_a, _run_all(runner, inputs.batches_b))
    return _Outputs(metric, stream.result(kind) if stream else None, kept)


def validate_models(
    runners: list[Runner],
    reference_name: str,
    inputs: EvalInputs,
    validate: ValidateConfig,
    vocab_size: int,
    kind: str,
    references: dict[str, str] | None = None,
    one_at_a_time: bool = False,
) -> list[ModelReport]:
    """Run each runner on the inputs; agreement is measured against the runner named ``reference_name``,
    or the one ``references`` names for it (models that are not the student's exports). Reference models
    run first, so every other model streams its agreement against them. Latency: the models take turns
    (:func:`exporters.runners.measure_latencies`), or with ``one_at_a_time`` each ONNX graph is timed right
    after its own run and closed, so one graph is in memory at a time (a decoder's six graphs)."""
    references = references or {}
    reference_of = {r.name: references.get(r.name, reference_name) for r in runners}
    needed = {reference_name, *references.values()}
    order = sorted(runners, key=lambda r: (r.name != reference_name, r.name not in needed))
    results: dict[str, _Outputs] = {}
    latencies: dict[str, list[Latency]] = {}
    for runner in order:
        reference = reference_of[runner.name]
        if runner.name != reference and reference not in results:
            raise ValueError(f"validation: {runner.name}'s reference {reference} runs after it")
        kept = None if runner.name == reference else results[reference].kept
        results[runner.name] = _run_streaming(runner, inputs, kept, kind, keep=runner.name in needed)
        if one_at_a_time:
            timed = measure_latencies([runner], validate.shapes, validate.warmup, validate.repeats, vocab_size)
            latencies[runner.name] = timed[runner.name]
            if isinstance(runner, OrtRunner):
                runner.close()
    if not one_at_a_time:
        latencies = measure_latencies(runners, validate.shapes, validate.warmup, validate.repeats, vocab_size)
    return [
        ModelReport(
            name=runner.name,
            runtime=runner.runtime,
            size_mb=round(runner.size_bytes / 2**20, 2),
            metric=results[runner.name].metric,
            agreement=results[runner.name].agreement,
            latency=[asdict(lat) for lat in latencies[runner.name]],
            reference=reference_of[runner.name],
        )
        for runner in runners
    ]


def _evaluate(runner: Runner, inputs: EvalInputs) -> tuple[float | None, np.ndarray]:
    outs_a, outs_b = _run_all(runner, inputs.batches_a), _run_all(runner, inputs.batches_b)
    flat = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs_a])
    return task_metric(inputs, outs_a, outs_b), flat


def evaluate_torch(model: TaskModel, inputs: EvalInputs) -> tuple[float | None, np.ndarray]:
    """Task metric of one PyTorch task model on prepared inputs, and its flattened outputs (for agreement)."""
    return _evaluate(TorchRunner("model", model, 0, torch.get_num_threads()), inputs)


def evaluate_onnx(path: Path, inputs: EvalInputs, threads: int) -> tuple[float | None, np.ndarray]:
    """Task metric of one ONNX graph on ONNX Runtime's CPU provider, and its flattened outputs."""
    return _evaluate(OrtRunner("model", path, threads), inputs)
