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
from calib.lm_text import LMText
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
    """ZSAQ's generator: text a pre-trained LM writes (:mod:`calib.lm_text`), and a learnable adapter that
    maps the LM's token representations (plus noise) into the teacher's embedding space, so no gradient
    has to pass through discrete tokens.

    The adapter's output is a residual on the teacher's own embeddings of that text, bounded per channel
    by ``radius`` times the embedding table's std (tanh) and started near zero: the game starts from
    natural, correctly framed text (what the teacher was tuned on) and the ascent looks for the student's
    worst inputs within that box around it.
    (Mapping the LM's hidden states straight into the embedding space, as a first version did, started
    ten times further from the teacher's inputs and lost to random tokens.)

    With a frozen LM (``lm=None``) the aligned hidden states are computed once (``features``); with ``lm``
    given, the LM runs (and learns) at every sample.
    """

    def __init__(
        self,
        text: LMText,
        features: torch.Tensor,
        table: torch.Tensor,
        noise_dim: int,
        hidden: int,
        radius: float,
        lm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("base", table[text.teacher_ids].clone())
        self.register_buffer("mask", text.attention_mask.clone())
        self.register_buffer("lm_ids", text.lm_ids.clone())
        self.register_buffer("lm_mask", text.lm_mask.clone())
        self.register_buffer("alignment", text.alignment.clone())
        self.register_buffer("features", None if lm is not None else features.detach().clone())
        self.register_buffer("bound", table.std(0) * radius)
        self.lm = lm
        self.noise_dim = noise_dim
        feature_dim = features.shape[-1] if lm is None else lm.config.hidden_size
        out = nn.Linear(hidden, table.shape[-1])
        nn.init.normal_(out.weight, std=1e-3)  # near-zero residual: start from the text itself
        nn.init.zeros_(out.bias)
        self.adapter = nn.Sequential(nn.Linear(feature_dim + noise_dim, hidden), nn.GELU(), out)

    def set_progress(self, fraction: float) -> None:
        """Nothing anneals in this generator."""

    def sample(self, batch: int, rng: torch.Generator) -> Batch:
        """A differentiable batch: the pooled text's embeddings plus the adapter's residual."""
        rows = torch.randint(len(self.base), (batch,), generator=rng)
        noise = torch.randn(batch, self.base.shape[1], self.noise_dim, generator=rng)
        if self.lm is None:
            features = self.features[rows]
        else:
            features = aligned_features(self.lm, self.lm_ids[rows], self.lm_mask[rows], self.alignment[rows])
        residual = torch.tanh(self.adapter(torch.cat([features, noise], dim=-1))) * self.bound
        embeds = self.base[rows] + residual
        mask = self.mask[rows]
        return Batch(mask, inputs_embeds=embeds * mask.unsqueeze(-1))


def aligned_features(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """The LM's last hidden states at each teacher position's LM token: ``[batch, seq_len, lm_hidden]``."""
    hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    return hidden.gather(1, alignment.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
