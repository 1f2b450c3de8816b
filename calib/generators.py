"""ZSAQ generators: differentiable pseudo-inputs in the teacher's word-embedding space.

Both generators return a :class:`calib.inputs.Batch` holding ``inputs_embeds`` (the model adds its own
position / segment embeddings) and an attention mask of varied lengths. Randomness comes from a
``torch.Generator`` passed in, so a run (and a resumed run) is reproducible under its seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calib.inputs import Batch, varied_mask
from calib.models import TaskModel


def gumbel_softmax(logits: torch.Tensor, temperature: float, rng: torch.Generator) -> torch.Tensor:
    """Relaxed one-hot samples; the Gumbel noise comes from ``rng``."""
    uniform = torch.rand(logits.shape, generator=rng).clamp(1e-9, 1 - 1e-9)
    gumbel = -torch.log(-torch.log(uniform))
    return F.softmax((logits + gumbel) / temperature, dim=-1)


def embedding_table(teacher: TaskModel) -> torch.Tensor:
    """The teacher's word-embedding matrix ``[vocab, hidden]`` (frozen)."""
    return teacher.backbone.get_input_embeddings().weight.detach()


def nearest_tokens(inputs_embeds: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For a person to read what was generated: the closest vocabulary row (cosine) at each position."""
    normed = F.normalize(table, dim=-1)
    return (F.normalize(inputs_embeds, dim=-1) @ normed.T).argmax(-1)


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
        noise = torch.randn(batch, 1, self.noise_dim, generator=rng).expand(-1, self.seq_len, -1)
        positions = self.positions.unsqueeze(0).expand(batch, -1, -1)
        logits = self.to_logits(self.mix(torch.cat([noise, positions], dim=-1)))
        embeds = gumbel_softmax(logits, self.temperature, rng) @ self.table
        mask = varied_mask(batch, self.seq_len, self.min_len, rng)
        return Batch(mask, inputs_embeds=embeds * mask.unsqueeze(-1))


class LMAdapterGenerator(nn.Module):
    """ZSAQ's generator: a pre-trained LM's token representations, mapped by a learnable adapter into the
    student's embedding space, so no gradient has to pass through discrete tokens.

    ``token_pool`` is text the LM sampled itself (``[pool, seq_len]``). With a frozen LM (``lm=None``) its
    last hidden states are computed once and cached (``features``); with ``lm`` given, the LM runs (and
    learns) at every sample. The adapter's output is standardised to the teacher's embedding statistics,
    so generation starts in distribution.
    """

    def __init__(
        self,
        token_pool: torch.Tensor,
        features: torch.Tensor,
        table: torch.Tensor,
        min_len: int,
        noise_dim: int,
        hidden: int,
        lm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("token_pool", token_pool.clone())
        self.register_buffer("features", None if lm is not None else features.detach().clone())
        self.lm = lm
        self.register_buffer("mean", table.mean(0))
        self.register_buffer("std", table.std(0))
        self.seq_len, self.min_len, self.noise_dim = token_pool.shape[1], min_len, noise_dim
        self.adapter = nn.Sequential(
            nn.Linear(features.shape[-1] + noise_dim, hidden), nn.GELU(), nn.Linear(hidden, table.shape[-1])
        )

    def set_progress(self, fraction: float) -> None:
        """Nothing anneals in this generator."""

    def sample(self, batch: int, rng: torch.Generator) -> Batch:
        """A differentiable batch: pooled LM features (plus noise) through the adapter."""
        rows = torch.randint(len(self.token_pool), (batch,), generator=rng)
        noise = torch.randn(batch, self.seq_len, self.noise_dim, generator=rng)
        if self.lm is None:
            features = self.features[rows]
        else:
            features = self.lm(input_ids=self.token_pool[rows], output_hidden_states=True).hidden_states[-1]
        out = self.adapter(torch.cat([features, noise], dim=-1))
        out = (out - out.mean(-1, keepdim=True)) / out.std(-1, keepdim=True).clamp(min=1e-6)
        embeds = out * self.std + self.mean
        mask = varied_mask(batch, self.seq_len, self.min_len, rng)
        return Batch(mask, inputs_embeds=embeds * mask.unsqueeze(-1))
