"""Checks only a decoder needs: its cached graph reproduces the full-sequence call, its greedy tokens match the
PyTorch model's, and how fast it fills a prompt and decodes one token on a cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from exporters.decoding import CacheStepper, OrtStepper, cached_logits, decode_latencies, greedy_tokens
from exporters.metrics import token_nll

# Fixed prompts for the greedy-generation check: short, varied openings a chat or completion user would type.
FIXED_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "The best way to learn a new language is",
    "In 1969, the first humans",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "The three primary colours are",
    "A good breakfast should include",
    "The weather today is",
    "Photosynthesis is the process by which",
    "My favourite book is",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "Machine learning models are trained by",
    "The history of the Roman Empire",
    "If you want to stay healthy, you should",
    "The main ingredients of bread are",
    "Dear hiring manager, I am writing to",
    "The sun rises in the",
    "A list of prime numbers: 2, 3, 5,",
)


def prompt_ids(tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, count: int, seed: int) -> list[list[int]]:
    """``count`` fixed prompts as token ids (cycling through :data:`FIXED_PROMPTS`); a model without a tokenizer
    gets seeded random prompts of 4 to 12 tokens instead."""
    if tokenizer is not None:
        texts = [FIXED_PROMPTS[i % len(FIXED_PROMPTS)] for i in range(count)]
        return [list(tokenizer(text)["input_ids"]) for text in texts]
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab_size, size=int(rng.integers(4, 13))).tolist() for _ in range(count)]


@dataclass(frozen=True)
class GreedyAgreement:
    """How many prompts' greedy continuations equal the reference's token for token, and where the others part."""

    prompts: int
    new_tokens: int
    exact: int
    first_divergence: list[int | None]  # per prompt: the first differing new-token position, None when equal

    @property
    def exact_share(self) -> float:
        return self.exact / max(self.prompts, 1)


def greedy_agreement(got: Sequence[Sequence[int]], want: Sequence[Sequence[int]]) -> GreedyAgreement:
    """Compare greedy continuations prompt by prompt."""
    divergence = []
    for a, b in zip(got, want):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        divergence.append(diff[0] if diff else None)
    exact = sum(d is None for d in divergence)
    return GreedyAgreement(len(divergence), len(want[0]) if want else 0, exact, divergence)


def continuations(stepper: CacheStepper, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation, one prompt at a time (no padding: the reference conditions)."""
    return [greedy_tokens(stepper, prompt, new_tokens) for prompt in prompts]


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """Perplexity of next-token predictions over every position of unpadded rows."""
    nll, count = token_nll(logits, ids, np.ones_like(ids))
    return float(np.exp(nll / count))


@dataclass(frozen=True)
class CacheConsistency:
    """Perplexity of the same windows through one full-sequence call and through the cache (prefill, then
    token by token), and their relative difference."""

    windows: int
    prefill: int
    full: float
    cached: float

    @property
    def relative_difference(self) -> float:
        return abs(self.cached - self.full) / self.full


def cache_consistency(stepper: OrtStepper, windows: np.ndarray) -> CacheConsistency:
    """Both perplexities of ``windows`` ``[n, seq]``, one window at a time (batch 1, how a decoder runs); the
    cache takes over after the first half of each."""
    prefill = windows.shape[1] // 2
    full, cached = [], []
    for row in windows:
        ids = row[None]
        full.append(stepper.full_sequence(ids, np.ones_like(ids)))
        cached.append(cached_logits(stepper, ids, prefill))
    return CacheConsistency(
        len(windows), prefill, _perplexity(np.concatenate(full), windows), _perplexity(np.concatenate(cached), windows)
    )


def decoder_report(
    graphs: dict[str, Callable[[], OrtStepper]],
    references: dict[str, CacheStepper],
    reference_of: dict[str, str],
    prompts: list[list[int]],
    windows: np.ndarray,
    settings: Any,
) -> dict[str, Any]:
    """Per graph: cache consistency, greedy agreement with its reference PyTorch model (``reference_of``), and
    prefill / decode latency (:func:`exporters.decoding.decode_latencies`). ``graphs`` open their stepper when
    called: each is opened when its turn comes and dropped after, so one graph is in memory at a time and its
    latency is timed alone. ``settings``: :class:`exporters.config.DecoderCheckConfig`."""
    wanted = {name: continuations(model, prompts, settings.new_tokens) for name, model in references.items()}
    rows = {}
    for name, open_graph in graphs.items():
        graph = open_graph()
        latency = decode_latencies({name: graph}, settings.batches, settings.past, settings.repeats)[name]
        agreement = greedy_agreement(continuations(graph, prompts, settings.new_tokens), wanted[reference_of[name]])
        consistency = cache_consistency(graph, windows)
        del graph
        rows[name] = {
            "reference": reference_of[name],
            "greedy": {**asdict(agreement), "exact_share": round(agreement.exact_share, 4)},
            "cache": {**asdict(consistency), "relative_difference": consistency.relative_difference},
            "latency": [{**asdict(lat), "tokens_per_second": lat.tokens_per_second} for lat in latency],
        }
    return {"prompts": len(prompts), "new_tokens": settings.new_tokens, "past": settings.past, "models": rows}
