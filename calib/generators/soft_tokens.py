"""The ``soft-tokens`` generator: noise -> per-position logits over the vocabulary -> Gumbel-softmax ->
times the teacher's embedding matrix."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from calib.errors import ConfigError
from calib.inputs import Batch, ordinary_ids, varied_mask
from calib.models import TaskModel, embedding_table

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from calib.config import CalibConfig


def gumbel_softmax(logits: torch.Tensor, temperature: float, rng: torch.Generator) -> torch.Tensor:
    """Relaxed one-hot samples; the Gumbel noise comes from ``rng``."""
    uniform = torch.rand(logits.shape, generator=rng, device=rng.device).clamp(1e-9, 1 - 1e-9)
    gumbel = -torch.log(-torch.log(uniform))
    return F.softmax((logits + gumbel) / temperature, dim=-1)


class SoftTokenGenerator(nn.Module):
    """Noise -> per-position logits over the allowed vocabulary -> Gumbel-softmax -> times the embeddings."""

    def __init__(
        self,
        table: torch.Tensor,
        allowed: torch.Tensor,
        seq_len: int,
        min_len: int,
        noise_dim: int,
        hidden: int,
        temperature: tuple[float, float],
    ) -> None:
        super().__init__()
        self.register_buffer("table", table[allowed].clone())
        self.register_buffer("allowed", allowed.clone())
        self.seq_len, self.min_len, self.noise_dim = seq_len, min_len, noise_dim
        self.temperature_range = temperature
        self.temperature = temperature[0]
        self.positions = nn.Parameter(torch.randn(seq_len, hidden) * 0.02)
        self.mix = nn.Sequential(nn.Linear(noise_dim + hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.to_logits = nn.Linear(hidden, len(allowed))

    def set_progress(self, fraction: float) -> None:
        """Anneal the temperature geometrically from start to end as training goes."""
        start, end = self.temperature_range
        self.temperature = start * (end / start) ** min(max(fraction, 0.0), 1.0)

    def sample(self, batch: int, rng: torch.Generator) -> Batch:
        """A differentiable batch of pseudo-inputs."""
        noise = torch.randn(batch, 1, self.noise_dim, generator=rng, device=rng.device).expand(-1, self.seq_len, -1)
        positions = self.positions.unsqueeze(0).expand(batch, -1, -1)
        logits = self.to_logits(self.mix(torch.cat([noise, positions], dim=-1)))
        embeds = gumbel_softmax(logits, self.temperature, rng) @ self.table
        mask = varied_mask(batch, self.seq_len, self.min_len, rng)
        return Batch(mask, inputs_embeds=embeds * mask.unsqueeze(-1))


def build(
    calib: CalibConfig, teacher: TaskModel, special_ids: tuple[int, ...], tokenizer: PreTrainedTokenizerBase | None
) -> SoftTokenGenerator:
    """A soft-token generator over the teacher's vocabulary (special tokens left out with ``restrict_vocab``)."""
    gen = calib.generator
    if gen.choose:
        raise ConfigError("calib.generator.choose: soft tokens have no pool of texts to choose from; "
                          "use calib.generator.kind: lm-adapter or choose: 0")  # fmt: skip
    table = embedding_table(teacher)
    allowed = ordinary_ids(len(table), special_ids if gen.restrict_vocab else ())
    return SoftTokenGenerator(
        table, allowed, calib.seq_len, gen.min_len, gen.noise_dim, gen.adapter_size,
        gen.temperature,
    )  # fmt: skip
