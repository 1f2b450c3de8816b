"""Data-free calibration inputs that need no learning (baselines).

``random-tokens``: token ids drawn uniformly from the vocabulary (special tokens excluded when the
tokenizer names them), with lengths varied so that padding and the attention mask are exercised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """Token ids and the attention mask, both int64 ``[samples, seq_len]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Split into (ids, mask) batches in order."""
        return [
            (self.input_ids[i : i + batch_size], self.attention_mask[i : i + batch_size])
            for i in range(0, len(self.input_ids), batch_size)
        ]


def random_tokens(
    samples: int,
    seq_len: int,
    vocab_size: int,
    seed: int,
    special_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    min_len_fraction: float = 0.25,
) -> TokenBatch:
    """Uniform ids over the non-special vocabulary; lengths uniform in [min_len_fraction*seq_len, seq_len]."""
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[list(special_ids)] = False
    pool = allowed.nonzero().squeeze(-1)
    ids = pool[torch.randint(len(pool), (samples, seq_len), generator=generator)]
    shortest = max(1, int(seq_len * min_len_fraction))
    lengths = torch.randint(shortest, seq_len + 1, (samples,), generator=generator)
    mask = (torch.arange(seq_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return TokenBatch(ids, mask)
