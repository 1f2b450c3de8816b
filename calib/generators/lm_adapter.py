"""The ``lm-adapter`` generator (ZSAQ's): text a pre-trained causal LM writes once, moved within a small box
around the teacher's embeddings of it by a learned adapter on the LM's hidden states."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from calib.errors import ConfigError
from calib.inputs import Batch, PooledText
from calib.lm_text import LMText, write_text
from calib.models import TaskModel, embedding_table, load_backbone, load_source_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from calib.config import CalibConfig


class LMAdapterGenerator(nn.Module):
    """A learned adapter from the LM's token representations (plus noise) to a residual on the teacher's
    embeddings of the LM's text, bounded per channel by ``radius`` x the table's std and started near zero
    (docs/ARCHITECTURE.md). With a frozen LM (``lm=None``) the aligned hidden states are computed once
    (``features``); with ``lm`` given, the LM runs (and learns) at every sample. With ``choose`` the texts are
    drawn from a learned categorical over the pool (``choice``, uniform at the start), the adversary's discrete
    move; with ``radius`` 0 the adapter is frozen (nothing to move) and the texts reach the teacher unchanged."""

    def __init__(
        self,
        text: LMText,
        features: torch.Tensor,
        table: torch.Tensor,
        noise_dim: int,
        hidden: int,
        radius: float,
        lm: nn.Module | None = None,
        choose: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("base", table[text.teacher_ids].clone())
        self.text = PooledText(text.teacher_ids.clone(), text.attention_mask.clone())  # not state: rebuilt from text
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
        self.adapter.requires_grad_(radius > 0)
        self.choice = nn.Parameter(torch.zeros(len(self.base))) if choose else None

    def set_progress(self, fraction: float) -> None:
        """Nothing anneals in this generator."""

    def sample(self, batch: int, rng: torch.Generator) -> Batch:
        """A differentiable batch: the pooled text's embeddings plus the adapter's residual."""
        if self.choice is None:
            rows = torch.randint(len(self.base), (batch,), generator=rng, device=rng.device)
        else:
            probs = torch.softmax(self.choice.detach(), dim=0).to(rng.device)
            rows = torch.multinomial(probs, batch, replacement=True, generator=rng)
        noise = torch.randn(batch, self.base.shape[1], self.noise_dim, generator=rng, device=rng.device)
        if self.lm is None:
            features = self.features[rows]
        else:
            features = aligned_features(self.lm, self.lm_ids[rows], self.lm_mask[rows], self.alignment[rows])
        residual = torch.tanh(self.adapter(torch.cat([features, noise], dim=-1))) * self.bound
        embeds = self.base[rows] + residual
        mask = self.mask[rows]
        return Batch(mask, inputs_embeds=embeds * mask.unsqueeze(-1), source=None if self.choice is None else rows)

    def choice_log_prob(self, rows: torch.Tensor) -> torch.Tensor:
        """The log-probability of drawing each of ``rows`` (a pool row each), differentiable in ``choice``."""
        assert self.choice is not None, "choice_log_prob needs calib.generator.choose"
        return torch.log_softmax(self.choice, dim=0)[rows.to(self.choice.device)]


def aligned_features(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """The LM's last hidden states at each teacher position's LM token: ``[batch, seq_len, lm_hidden]``."""
    hidden = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    return hidden.gather(1, alignment.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def build(
    calib: CalibConfig, teacher: TaskModel, special_ids: tuple[int, ...], tokenizer: PreTrainedTokenizerBase | None
) -> LMAdapterGenerator:
    """The adapter over text ``calib.generator.model`` writes (read by the teacher's ``tokenizer``), or over
    text a causal-LM teacher writes itself."""
    from calib.config import TaskConfig

    gen = calib.generator
    if gen.radius == 0 and not gen.choose:
        raise ConfigError("calib.generator.radius: 0 leaves the adversary nothing to move; "
                          "set calib.generator.choose above 0 (it then chooses texts) or a radius above 0")  # fmt: skip
    table = embedding_table(teacher)
    if gen.model is not None:
        if tokenizer is None:
            raise ConfigError("calib.generator.model: the teacher has no tokenizer to read the generator LM's text")
        lm = load_backbone(gen.model, TaskConfig(kind="causal-lm"))
        tokenizers = (load_source_tokenizer(gen.model), tokenizer)
    elif teacher.kind == "causal-lm":
        lm, tokenizers = teacher.backbone, None  # a decoder generates for itself
    else:
        raise ConfigError("calib.generator.model: the lm-adapter generator needs a causal LM for this teacher")
    text = write_text(
        lm, gen.pool, calib.seq_len, gen.min_len, calib.seed, tokenizers, gen.pairs, gen.random_share,
        greedy_tokens=gen.greedy_tokens,
    )  # fmt: skip
    trainable_lm = None
    features = torch.empty(0)
    if gen.learn_lm:
        if lm is teacher.backbone:
            raise ConfigError("calib.generator.learn_lm: the teacher itself cannot learn; name a generator model")
        trainable_lm = lm.requires_grad_(True)
    else:
        with torch.no_grad():
            features = torch.cat(
                [
                    aligned_features(lm, text.lm_ids[i : i + 16], text.lm_mask[i : i + 16], text.alignment[i : i + 16])
                    for i in range(0, gen.pool, 16)
                ]
            )
        torch.manual_seed(calib.seed)
    return LMAdapterGenerator(
        text, features, table, gen.noise_dim, gen.adapter_size, gen.radius, trainable_lm, choose=gen.choose > 0
    )
