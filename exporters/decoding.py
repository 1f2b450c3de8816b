"""A causal LM's KV-cache graph at run time, laid out as ONNX Runtime GenAI and Optimum lay it out: inputs
``input_ids``, ``attention_mask`` (past and new positions), ``position_ids``, ``past_key_values.{i}.key`` /
``.value`` (``[batch, kv_heads, past, head_dim]``); outputs ``logits`` and ``present.{i}.key`` / ``.value``. One
graph serves the prompt (past length 0) and every next token. Decoding is one interface for the graph and for a
PyTorch model (:class:`exporters.runners.TorchStepper`); batches are left-padded, as a server batches prompts.

Self-contained (numpy and onnxruntime only): Triton model repositories carry a copy of this file."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

CACHED_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"


def past_name(layer: int, role: str) -> str:
    """The graph input holding layer ``layer``'s cached ``role`` (``key`` or ``value``)."""
    return f"past_key_values.{layer}.{role}"


def present_name(layer: int, role: str) -> str:
    """The graph output holding layer ``layer``'s ``role`` after this call (past and new positions)."""
    return f"present.{layer}.{role}"


@dataclass(frozen=True)
class CacheLayout:
    """How many layers cache keys and values, each cached tensor's heads and head width, and its element type
    (``int8`` for a cache quantized per head: ``quant.kv_cache``)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @property
    def past_names(self) -> list[str]:
        """The past inputs in graph order (key, value of layer 0, then layer 1, ...)."""
        return [past_name(i, role) for i in range(self.layers) for role in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        """The present outputs in the order of :attr:`past_names`."""
        return [present_name(i, role) for i in range(self.layers) for role in ("key", "value")]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Past tensors of length 0: the prompt's call."""
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for _ in self.past_names]


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """:func:`calib.models.causal_positions` for the graph's numpy inputs."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


class CacheStepper(Protocol):
    """One call of a causal LM with a cache: ``(ids, mask over past + new, positions, past) -> (logits, present)``."""

    def __call__(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]: ...

    def empty_past(self, batch: int) -> Any: ...


CACHE_TYPES = {"tensor(float)": "float32", "tensor(int8)": "int8"}  # ONNX Runtime's input type -> numpy's


def graph_cache_layout(session: ort.InferenceSession) -> CacheLayout | None:
    """The cache layout a session's inputs declare, or None for a graph without a KV cache."""
    inputs = {i.name: i for i in session.get_inputs()}
    if past_name(0, "key") not in inputs:
        return None
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    first = inputs[past_name(0, "key")]
    _, heads, _, dim = first.shape
    return CacheLayout(layers, int(heads), int(dim), CACHE_TYPES[first.type])


def takes_positions(session: ort.InferenceSession) -> bool:
    """Whether the graph reads ``position_ids`` (ONNX Runtime GenAI's GroupQueryAttention graphs derive positions
    from the attention mask instead, which holds for rows without padding only)."""
    return any(i.name == "position_ids" for i in session.get_inputs())


def run_full_sequence(
    session: ort.InferenceSession,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    layout: CacheLayout | None = None,
) -> np.ndarray:
    """The first output of one call on whole sequences; a cached graph gets positions (where it reads them) and
    an empty past (:meth:`OrtStepper.full_sequence`). ``layout``: the cache layout of a graph whose inputs leave
    the head width symbolic."""
    layout = layout or graph_cache_layout(session)
    if layout is None:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        return session.run([session.get_outputs()[0].name], feed)[0]
    return OrtStepper(session, layout=layout).full_sequence(input_ids, attention_mask)


class OrtStepper:
    """An exported cached graph on ONNX Runtime; ``layout`` for a graph whose inputs leave the head width symbolic
    (ONNX Runtime GenAI's). ``positions`` are fed only to a graph that reads them (:func:`takes_positions`)."""

    def __init__(
        self, model: Path | ort.InferenceSession, threads: int | None = None, layout: CacheLayout | None = None
    ) -> None:
        if not isinstance(model, ort.InferenceSession):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or 0
            model = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.session = model
        self._positions = takes_positions(self.session)
        layout = layout or graph_cache_layout(self.session)
        if layout is None:
            raise ValueError(f"{model}: the graph has no KV-cache inputs ({past_name(0, 'key')})")
        self.layout = layout
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1])
        self._outputs = [LOGITS, *layout.present_names]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return self.layout.empty_past(batch)

    def _feed(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
    ) -> dict[str, np.ndarray]:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, **dict(zip(self.layout.past_names, past))}
        if self._positions:
            feed["position_ids"] = positions
        return feed

    def __call__(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *present = self.session.run(self._outputs, self._feed(input_ids, attention_mask, positions, past))
        return logits, present

    def full_sequence(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The logits of one call on whole sequences (an empty past; the presents are not fetched)."""
        past = self.empty_past(len(input_ids))
        return self.session.run([LOGITS], self._feed(input_ids, attention_mask, position_ids(attention_mask), past))[0]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask of prompts padded on the left to the longest (every last token in the last column)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    return ids, mask


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise sampling from the top ``top_k`` tokens (0: all)."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0


def _next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """One token per row from last-position logits ``[batch, vocab]``."""
    if sampling.temperature <= 0:
        return logits.argmax(-1).astype(np.int64)
    scaled = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < scaled.shape[-1]:
        cut = np.partition(scaled, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        scaled = np.where(scaled < cut, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)


def generate(
    stepper: CacheStepper,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int = 0,
    eos_id: int | None = None,
    sampling: Sampling = Sampling(),
) -> Iterator[np.ndarray]:
    """Yield the next token of every prompt, ``max_new_tokens`` times or until every row has ended with
    ``eos_id`` (an ended row keeps yielding ``pad_id``). Prompts run as one left-padded batch."""
    ids, mask = left_pad(prompts, pad_id)
    rng = np.random.default_rng(sampling.seed)
    logits, past = stepper(ids, mask, position_ids(mask), stepper.empty_past(len(prompts)))
    positions = position_ids(mask)[:, -1:]
    done = np.zeros(len(prompts), dtype=bool)
    for step in range(max_new_tokens):
        tokens = np.where(done, pad_id, _next_tokens(logits[:, -1], sampling, rng))
        yield tokens
        if eos_id is not None:
            done |= tokens == eos_id
        if done.all() or step == max_new_tokens - 1:
            return
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        positions = positions + 1
        logits, past = stepper(tokens[:, None], mask, positions, past)


def greedy_tokens(stepper: CacheStepper, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """The greedy continuation of one prompt (no end-of-sequence stop: comparisons need equal lengths)."""
    return [int(t[0]) for t in generate(stepper, [prompt], max_new_tokens)]


def cached_logits(stepper: CacheStepper, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits of every position of ``ids`` ``[batch, seq]`` (no padding) with the first ``prefill`` tokens as one
    call and every later token as a call on the cache: what a full-sequence call must reproduce."""
    mask = np.ones_like(ids)
    first = mask[:, :prefill]
    logits, past = stepper(ids[:, :prefill], first, position_ids(first), stepper.empty_past(len(ids)))
    outs = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, past = stepper(ids[:, t : t + 1], mask[:, : t + 1], position_ids(mask[:, : t + 1])[:, -1:], past)
        outs.append(logits)
    return np.concatenate(outs, axis=1)


@dataclass(frozen=True)
class DecodeLatency:
    """Median milliseconds of one prompt call and of one next-token call on a cache of ``past`` tokens."""

    batch: int
    prefill_ms: float
    decode_ms: float
    past: int

    @property
    def tokens_per_second(self) -> float:
        return round(self.batch * 1000.0 / self.decode_ms, 1)


def decode_latencies(
    steppers: dict[str, OrtStepper], batches: Sequence[int], past: int, repeats: int, blocks: int = 3
) -> dict[str, list[DecodeLatency]]:
    """Prefill (``batch x past`` prompt) and next-token latency at past length ``past`` of every graph, side by
    side: the graphs take turns in ``blocks`` blocks per batch size, each opened by an untimed call."""
    rng = np.random.default_rng(0)
    vocab = min(stepper.vocab_size for stepper in steppers.values())
    result: dict[str, list[DecodeLatency]] = {name: [] for name in steppers}
    for batch in batches:
        ids = rng.integers(1, vocab, size=(batch, past), dtype=np.int64)
        mask = np.ones_like(ids)
        token, step_mask = ids[:, -1:], np.ones((batch, past + 1), dtype=np.int64)
        step_pos = np.full((batch, 1), past, dtype=np.int64)
        prefill_times: dict[str, list[float]] = {name: [] for name in steppers}
        decode_times: dict[str, list[float]] = {name: [] for name in steppers}
        for _ in range(blocks):
            for name, stepper in steppers.items():
                start = time.perf_counter()
                _, cache = stepper(ids, mask, position_ids(mask), stepper.empty_past(batch))
                prefill_times[name].append((time.perf_counter() - start) * 1000.0)
                stepper(token, step_mask, step_pos, cache)  # untimed: the first call after a prefill
                for _ in range(max(1, repeats // blocks)):
                    start = time.perf_counter()
                    stepper(token, step_mask, step_pos, cache)
                    decode_times[name].append((time.perf_counter() - start) * 1000.0)
        for name in steppers:
            result[name].append(
                DecodeLatency(
                    batch,
                    round(float(np.median(prefill_times[name])), 3),
                    round(float(np.median(decode_times[name])), 3),
                    past,
                )
            )
    return result
