"""ZSAQ calibration end to end: build the generator, initialise the student on its first samples, play
SAM-SGA (with checkpoints), and hand back the calibration set the generator ends up producing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from calib.generators import LMAdapterGenerator, SoftTokenGenerator, aligned_features, embedding_table
from calib.inputs import Batch, CalibrationSet
from calib.lm_text import write_text
from calib.models import TaskModel, load_backbone, load_source_tokenizer
from calib.sam_sga import SamSga
from calib.student import build_student, init_ranges
from pipeline.config import PipelineConfig, TaskConfig
from pipeline.errors import ConfigError

LM_POOL = 64  # sequences the lm-adapter's LM samples once


def build_generator(
    config: PipelineConfig,
    teacher: TaskModel,
    special_ids: tuple[int, ...],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> torch.nn.Module:
    """The configured generator, deterministic under ``calib.seed``. ``tokenizer`` is the teacher's: the
    lm-adapter needs it to read a separate generator LM's text."""
    calib, gen = config.calib, config.calib.generator
    torch.manual_seed(calib.seed)
    table = embedding_table(teacher)
    if gen.kind == "soft-tokens":
        allowed = torch.ones(len(table), dtype=torch.bool)
        if gen.restrict_vocab and special_ids:
            allowed[list(special_ids)] = False
        return SoftTokenGenerator(
            table, allowed.nonzero().squeeze(-1), calib.seq_len, gen.min_len, gen.noise_dim, gen.adapter_size,
            gen.temperature,
        )  # fmt: skip
    if gen.model is not None:
        if tokenizer is None:
            raise ConfigError("calib.generator.model: the teacher has no tokenizer to read the generator LM's text")
        lm = load_backbone(gen.model, TaskConfig(kind="causal-lm"))
        tokenizers = (load_source_tokenizer(gen.model), tokenizer)
    elif teacher.kind == "causal-lm":
        lm, tokenizers = teacher.backbone, None  # a decoder generates for itself
    else:
        raise ConfigError("calib.generator.model: the lm-adapter generator needs a causal LM for this teacher")
    text = write_text(lm, LM_POOL, calib.seq_len, gen.min_len, calib.seed, tokenizers)
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
                    for i in range(0, LM_POOL, 16)
                ]
            )
        torch.manual_seed(calib.seed)
    return LMAdapterGenerator(text, features, table, gen.noise_dim, gen.adapter_size, gen.radius, trainable_lm)


@torch.no_grad()
def generated_set(generator: torch.nn.Module, samples: int, batch_size: int, rng: torch.Generator) -> CalibrationSet:
    """``samples`` detached pseudo-inputs from the generator."""
    batches: list[Batch] = [generator.sample(min(batch_size, samples - i), rng) for i in range(0, samples, batch_size)]
    return CalibrationSet(
        torch.cat([b.attention_mask for b in batches]), inputs_embeds=torch.cat([b.inputs_embeds for b in batches])
    )


def calibrate_zsaq(
    config: PipelineConfig,
    teacher: TaskModel,
    special_ids: tuple[int, ...],
    checkpoint_path: Path | None = None,
    save_checkpoint: Callable[[dict, Path], None] | None = None,
    show_progress: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[SamSga, CalibrationSet]:
    """Play SAM-SGA, resuming from ``checkpoint_path`` when it exists (and saving there every N rounds
    through ``save_checkpoint``); returns the game and the final calibration set."""
    calib = config.calib
    rng = torch.Generator().manual_seed(calib.seed)
    generator = build_generator(config, teacher, special_ids, tokenizer)
    student = build_student(teacher, config.quant)
    init_ranges(
        student, config.quant, generated_set(generator, calib.samples, calib.batch_size, rng).batches(calib.batch_size)
    )
    game = SamSga(teacher, student, generator, calib, config.quant.learn, rng)
    checkpoint = None
    if checkpoint_path is not None and save_checkpoint is not None:
        if checkpoint_path.is_file():
            game.load_state_dict(torch.load(checkpoint_path, weights_only=True))
        checkpoint = lambda: save_checkpoint(game.state_dict(), checkpoint_path)  # noqa: E731
    game.play(calib.sam_sga.rounds, checkpoint, show_progress)
    return game, generated_set(generator, calib.samples, calib.batch_size, rng)
