"""Calibration batches and sets, and the data-free inputs that need no learning: random tokens (special
tokens excluded, lengths varied so padding and the mask are exercised) and Gaussian embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from calib.models import TaskModel, TaskOutput, embedding_table

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from calib.methods import Calibration, CalibrationRequest


@dataclass
class Batch:
    """One batch of model inputs: token ids or word embeddings (``[b, s, hidden]``), and the mask; ``source``:
    the pool rows a choosing generator drew them from (its ascent's score-function gradient needs them)."""

    attention_mask: torch.Tensor
    input_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    source: torch.Tensor | None = None

    def run(self, model: TaskModel, output_hidden_states: bool = False) -> TaskOutput:
        """Forward ``model`` on this batch."""
        return model.run(
            self.attention_mask,
            input_ids=self.input_ids,
            inputs_embeds=self.inputs_embeds,
            output_hidden_states=output_hidden_states,
        )

    def __len__(self) -> int:
        return len(self.attention_mask)

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (itself when it is there)."""
        tensors = (self.attention_mask, self.input_ids, self.inputs_embeds, self.source)
        return Batch(*(None if t is None else t.to(device) for t in tensors))

    def rows(self, part: range) -> Batch:
        """The batch's rows ``part`` (itself when that is all of them)."""
        if part.start == 0 and part.stop == len(self):
            return self

        def cut(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[part.start : part.stop]

        return Batch(cut(self.attention_mask), cut(self.input_ids), cut(self.inputs_embeds), cut(self.source))


@dataclass
class CalibrationSet:
    """Every calibration sample: int64 ids or float embeddings, with an int64 ``[samples, seq_len]`` mask."""

    attention_mask: torch.Tensor
    input_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.attention_mask)

    def batches(self, batch_size: int) -> list[Batch]:
        """Split into batches in order."""
        whole = Batch(self.attention_mask, self.input_ids, self.inputs_embeds)
        return [whole.rows(range(i, min(i + batch_size, len(self)))) for i in range(0, len(self), batch_size)]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The set as named tensors (for safetensors)."""
        named = {
            "attention_mask": self.attention_mask,
            "input_ids": self.input_ids,
            "inputs_embeds": self.inputs_embeds,
        }
        return {k: v.cpu().contiguous() for k, v in named.items() if v is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> CalibrationSet:
        """Inverse of :meth:`tensors`."""
        return cls(tensors["attention_mask"], tensors.get("input_ids"), tensors.get("inputs_embeds"))


def special_token_ids(tokenizer: PreTrainedTokenizerBase | None) -> tuple[tuple[int, ...], int]:
    """(special and unused ids to avoid, pad id); nothing to avoid without a tokenizer."""
    if tokenizer is None:
        return (), 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    specials = set(tokenizer.all_special_ids)
    specials.update(i for tok, i in tokenizer.get_vocab().items() if tok.startswith("[unused"))
    return tuple(sorted(specials)), pad


def ordinary_ids(vocab_size: int, special_ids: tuple[int, ...] | list[int] = ()) -> torch.Tensor:
    """int64 ids of the vocabulary, ``special_ids`` left out: the pool random and soft tokens draw from."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[list(special_ids)] = False
    return allowed.nonzero().squeeze(-1)


def varied_mask(batch: int, seq_len: int, min_len: int, rng: torch.Generator) -> torch.Tensor:
    """int64 ``[batch, seq_len]`` mask with lengths uniform in ``[min_len, seq_len]`` (padding on the right)."""
    lengths = torch.randint(min_len, seq_len + 1, (batch,), generator=rng, device=rng.device)
    return (torch.arange(seq_len, device=rng.device).unsqueeze(0) < lengths.unsqueeze(1)).long()


class AnchorSource(Protocol):
    """Inputs the generator does not move, drawn batch by batch (``calib.sam_sga.anchor``)."""

    def sample(self, batch: int, rng: torch.Generator) -> Batch:
        """``batch`` fresh sequences from ``rng`` (on its device)."""
        ...


@dataclass
class PooledText:
    """Fixed token sequences (``ids``, ``mask``: ``[pool, seq_len]``), drawn by row with replacement: text an LM
    wrote once, as ids of the teacher's vocabulary."""

    ids: torch.Tensor
    mask: torch.Tensor

    def sample(self, batch: int, rng: torch.Generator) -> Batch:
        """``batch`` rows drawn from ``rng`` (on its device)."""
        rows = torch.randint(len(self.ids), (batch,), generator=rng, device=rng.device).cpu()
        return Batch(self.mask[rows].to(rng.device), input_ids=self.ids[rows].to(rng.device))


@dataclass
class RandomTokenSource:
    """Uniform ids over the non-special vocabulary (``pool``, from :func:`ordinary_ids`), lengths uniform in
    ``[min_len_fraction*seq_len, seq_len]``, padded with ``pad_id``: QAT-Rand's inputs, drawn batch by batch."""

    pool: torch.Tensor
    seq_len: int
    pad_id: int = 0
    min_len_fraction: float = 0.25

    def sample(self, batch: int, rng: torch.Generator) -> Batch:
        """``batch`` fresh sequences from ``rng`` (on its device)."""
        pool = self.pool.to(rng.device)
        ids = pool[torch.randint(len(pool), (batch, self.seq_len), generator=rng, device=rng.device)]
        mask = varied_mask(batch, self.seq_len, max(1, int(self.seq_len * self.min_len_fraction)), rng)
        return Batch(mask, input_ids=torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_id)))

    def calibration_set(self, samples: int, seed: int) -> CalibrationSet:
        """``samples`` sequences drawn by a generator seeded with ``seed``."""
        batch = self.sample(samples, torch.Generator().manual_seed(seed))
        return CalibrationSet(batch.attention_mask, input_ids=batch.input_ids)


def random_token_source(
    teacher: TaskModel, tokenizer: PreTrainedTokenizerBase | None, seq_len: int
) -> RandomTokenSource:
    """The :class:`RandomTokenSource` of ``teacher``'s vocabulary, its tokenizer's special tokens left out."""
    specials, pad = special_token_ids(tokenizer)
    return RandomTokenSource(ordinary_ids(len(embedding_table(teacher)), specials), seq_len, pad)


def random_tokens(
    samples: int,
    seq_len: int,
    vocab_size: int,
    seed: int,
    special_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    min_len_fraction: float = 0.25,
) -> CalibrationSet:
    """``samples`` sequences of a :class:`RandomTokenSource` over ``vocab_size``, seeded by ``seed``."""
    source = RandomTokenSource(ordinary_ids(vocab_size, special_ids), seq_len, pad_id, min_len_fraction)
    return source.calibration_set(samples, seed)


def gaussian_embeds(
    samples: int, seq_len: int, table: torch.Tensor, seed: int, min_len_fraction: float = 0.25
) -> CalibrationSet:
    """Word embeddings drawn per channel from N(mean, std) of the embedding table; lengths varied."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, seq_len, table.shape[1], generator=generator)
    embeds = noise * table.std(0) + table.mean(0)
    mask = varied_mask(samples, seq_len, max(1, int(seq_len * min_len_fraction)), generator)
    return CalibrationSet(mask, inputs_embeds=embeds * mask.unsqueeze(-1))


def random_token_inputs(request: CalibrationRequest) -> Calibration:
    """The ``random-tokens`` method: :func:`random_tokens` over the teacher's non-special vocabulary."""
    from calib.methods import Calibration

    calib = request.calib
    source = random_token_source(request.teacher, request.tokenizer, calib.seq_len)
    return Calibration(source.calibration_set(calib.samples, calib.seed))


def gaussian_embed_inputs(request: CalibrationRequest) -> Calibration:
    """The ``gaussian-embeds`` method: :func:`gaussian_embeds` from the teacher's embedding table."""
    from calib.methods import Calibration

    calib = request.calib
    return Calibration(gaussian_embeds(calib.samples, calib.seq_len, embedding_table(request.teacher), calib.seed))
