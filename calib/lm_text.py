"""Text a causal LM writes itself: LLM-QAT's data-free inputs (``teacher-sampled``), and, read by the teacher
with each token lined up with its LM token, the lm-adapter generator's starting point (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from calib.errors import ConfigError

if TYPE_CHECKING:
    from calib.methods import Calibration, CalibrationRequest
from calib.inputs import ordinary_ids, varied_mask


@torch.no_grad()
def sample_sequences(
    lm: PreTrainedModel,
    samples: int,
    seq_len: int,
    seed: int,
    batch_size: int = 16,
    top_k: int = 50,
    greedy_tokens: int = 0,
) -> torch.Tensor:
    """int64 ``[samples, seq_len]``: each sequence starts from a uniformly drawn token, takes the LM's top-1 for
    the next ``greedy_tokens`` (LLM-QAT's hybrid sampling: a random start settled into likely text), then samples
    top-k (the whole vocabulary when it is smaller)."""
    rng = torch.Generator().manual_seed(seed)
    vocab = lm.get_output_embeddings().weight.shape[0]
    rows = [torch.empty(0, seq_len, dtype=torch.long)]  # none asked: the pool may be all random tokens
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        ids = torch.randint(vocab, (count, 1), generator=rng)
        past = None
        step_input = ids
        for position in range(1, seq_len):
            out = lm(input_ids=step_input, cache=past, use_cache=True)  # transformers 5: ``cache``
            past = out.cache
            logits = out.logits[:, -1].float()
            if position <= greedy_tokens:
                step_input = logits.argmax(-1, keepdim=True)
            else:
                top = logits.topk(min(top_k, vocab), dim=-1)
                choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=rng)
                step_input = top.indices.gather(-1, choice)
            ids = torch.cat([ids, step_input], dim=1)
        rows.append(ids)
    return torch.cat(rows)


def sampled_inputs(request: CalibrationRequest) -> Calibration:
    """The ``teacher-sampled`` method (LLM-QAT): sequences a causal-LM teacher samples itself."""
    from calib.inputs import CalibrationSet
    from calib.methods import Calibration

    calib = request.calib
    greedy = calib.generator.greedy_tokens
    ids = sample_sequences(request.teacher.backbone, calib.samples, calib.seq_len, calib.seed, greedy_tokens=greedy)
    return Calibration(CalibrationSet(torch.ones_like(ids), input_ids=ids))


@dataclass
class LMText:
    """The pool: teacher ids and mask ``[pool, seq_len]``; the LM's ids and mask ``[pool, lm_len]``; and for
    every teacher position the index of its LM token (``alignment``, ``[pool, seq_len]``)."""

    teacher_ids: torch.Tensor
    attention_mask: torch.Tensor
    lm_ids: torch.Tensor
    lm_mask: torch.Tensor
    alignment: torch.Tensor


def align_tokens(teacher_offsets: list[tuple[int, int]], lm_offsets: list[tuple[int, int]]) -> list[int]:
    """For each teacher token, the index of the last LM token that starts at or before its first character.

    Special tokens (offsets ``(0, 0)``) take the LM token of the previous teacher position (the first
    LM token for a leading [CLS]), so a framing token carries the context read so far.
    """
    starts = [start for start, _ in lm_offsets]  # non-decreasing: the LM reads left to right
    aligned, previous = [], 0
    for start, end in teacher_offsets:
        if end > start:
            previous = max(0, bisect.bisect_right(starts, start) - 1)
        aligned.append(previous)
    return aligned


def write_text(
    lm: PreTrainedModel,
    samples: int,
    seq_len: int,
    min_len: int,
    seed: int,
    tokenizers: tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase] | None = None,
    pairs: float = 0.0,
    random_share: float = 0.0,
    greedy_tokens: int = 0,
) -> LMText:
    """``samples`` sequences: the LM writes them, but for the last ``random_share`` of them, which are uniform
    tokens of the teacher's vocabulary (special tokens aside). ``tokenizers`` is ``(lm_tokenizer,
    teacher_tokenizer)`` when the teacher reads another vocabulary; ``None`` when the LM is the teacher. The
    first ``pairs`` share of the sequences the teacher reads as sentence pairs (:func:`split_pair`);
    ``greedy_tokens`` as :func:`sample_sequences`."""
    randoms = round(random_share * samples)
    mask = varied_mask(samples, seq_len, min_len, torch.Generator().manual_seed(seed + 1))  # apart from the LM's
    rng = torch.Generator().manual_seed(seed + 2)
    if tokenizers is None:
        vocab = lm.get_output_embeddings().weight.shape[0]
        noise = torch.randint(vocab, (randoms, seq_len), generator=rng)
        ids = torch.cat([sample_sequences(lm, samples - randoms, seq_len, seed, greedy_tokens=greedy_tokens), noise])
        alignment = torch.arange(seq_len).expand(samples, -1).clone()
        return LMText(ids * mask, mask, ids, mask, alignment)
    lm_tokenizer, teacher_tokenizer = tokenizers
    if not (lm_tokenizer.is_fast and teacher_tokenizer.is_fast):
        raise ConfigError("calib.generator.model: the lm-adapter needs fast tokenizers (character offsets)")
    if lm_tokenizer.pad_token is None:  # GPT-2's has none; padded positions are masked out anyway
        lm_tokenizer.pad_token = lm_tokenizer.eos_token
    lengths = mask.sum(1).tolist()
    ids = sample_sequences(lm, samples - randoms, seq_len, seed, greedy_tokens=greedy_tokens)
    texts = [lm_tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(ids, lengths)]
    texts += random_text(teacher_tokenizer, lengths[samples - randoms :], rng)
    teacher = read_as_teacher(teacher_tokenizer, texts, round(pairs * samples), seq_len)
    lm_side = lm_tokenizer(
        texts, padding="max_length", truncation=True, max_length=seq_len, return_offsets_mapping=True,
        return_tensors="pt", add_special_tokens=False,
    )  # fmt: skip
    alignment = [
        align_tokens(t_offsets.tolist(), l_offsets[l_mask.bool()].tolist())
        for t_offsets, l_offsets, l_mask in zip(
            teacher["offset_mapping"], lm_side["offset_mapping"], lm_side["attention_mask"]
        )
    ]
    return LMText(
        teacher["input_ids"].long(), teacher["attention_mask"].long(), lm_side["input_ids"].long(),
        lm_side["attention_mask"].long(), torch.tensor(alignment),
    )  # fmt: skip


def random_text(tokenizer: PreTrainedTokenizerBase, lengths: list[int], rng: torch.Generator) -> list[str]:
    """Texts of ``lengths`` tokens drawn uniformly from ``tokenizer``'s vocabulary, special tokens aside (the
    ``random-tokens`` inputs, as text both tokenizers can read)."""
    pool = ordinary_ids(len(tokenizer), tokenizer.all_special_ids)
    return [tokenizer.decode(pool[torch.randint(len(pool), (n,), generator=rng)].tolist()) for n in lengths]


def split_pair(text: str) -> tuple[str, str, int]:
    """``text`` cut at the space nearest its middle: the two sentences of a pair, and where the second
    starts in ``text`` (a text without spaces is cut at its middle character)."""
    middle = len(text) // 2
    spaces = [i for i, char in enumerate(text) if char == " "]
    if not spaces:
        return text[:middle], text[middle:], middle
    cut = min(spaces, key=lambda i: abs(i - middle))
    return text[:cut], text[cut + 1 :], cut + 1


def read_as_teacher(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], pair_count: int, seq_len: int
) -> dict[str, torch.Tensor]:
    """The teacher's ids, mask and character offsets into ``texts``; the first ``pair_count`` texts read as
    sentence pairs (``[CLS] a [SEP] b [SEP]``, as a pair task's teacher reads its inputs), the rest alone.
    The second sentence's offsets are shifted back into the whole text, so the LM alignment holds for both."""
    settings = dict(padding="max_length", truncation=True, max_length=seq_len, return_offsets_mapping=True)
    parts = []
    if pair_count:
        cut = [split_pair(text) for text in texts[:pair_count]]
        pair = tokenizer([a for a, _, _ in cut], [b for _, b, _ in cut], return_tensors="pt", **settings)
        offsets = pair["offset_mapping"]
        for row, (_, _, shift) in enumerate(cut):
            second = torch.tensor([segment == 1 for segment in pair.sequence_ids(row)])
            second &= offsets[row, :, 1] > offsets[row, :, 0]  # special tokens keep (0, 0)
            offsets[row, second] += shift
        parts.append(pair)
    if pair_count < len(texts):
        parts.append(tokenizer(texts[pair_count:], return_tensors="pt", **settings))
    keys = ("input_ids", "attention_mask", "offset_mapping")
    return {key: torch.cat([part[key] for part in parts]) for key in keys}
