"""ZSAQ calibration end to end: build the generator, initialise the student on its first samples, play
SAM-SGA (with checkpoints), and hand back the calibration set the generator ends up producing."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from calib.config import CalibConfig
from calib.inputs import Batch, CalibrationSet, special_token_ids
from calib.methods import Calibration, CalibrationRequest
from calib.models import TaskModel
from calib.registry import GENERATORS
from calib.sam_sga import SamSga
from calib.student import build_student, init_ranges


def build_generator(
    calib: CalibConfig,
    teacher: TaskModel,
    special_ids: tuple[int, ...],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> torch.nn.Module:
    """The configured generator kind, deterministic under ``calib.seed``. ``tokenizer`` is the teacher's (a
    generator reading another model's text needs it)."""
    torch.manual_seed(calib.seed)
    return GENERATORS[calib.generator.kind].load()(calib, teacher, special_ids, tokenizer)


@torch.no_grad()
def generated_set(generator: torch.nn.Module, samples: int, batch_size: int, rng: torch.Generator) -> CalibrationSet:
    """``samples`` detached pseudo-inputs from the generator."""
    batches: list[Batch] = [generator.sample(min(batch_size, samples - i), rng) for i in range(0, samples, batch_size)]
    return CalibrationSet(
        torch.cat([b.attention_mask for b in batches]), inputs_embeds=torch.cat([b.inputs_embeds for b in batches])
    )


def _save_checkpoint(state: dict, path: Path) -> None:
    """Through a temporary name: a process killed while saving leaves the previous checkpoint whole."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def calibrate_zsaq(request: CalibrationRequest) -> Calibration:
    """Play SAM-SGA, resuming from ``request.checkpoint`` when it exists (and saving there every N rounds);
    returns the final calibration set and the game (its student, generator and history)."""
    calib, quant = request.calib, request.quant
    rng = torch.Generator().manual_seed(calib.seed)
    generator = build_generator(calib, request.teacher, special_token_ids(request.tokenizer)[0], request.tokenizer)
    student = build_student(request.teacher, quant)
    init_ranges(
        student, quant, generated_set(generator, calib.samples, calib.batch_size, rng).batches(calib.batch_size)
    )
    game = SamSga(request.teacher, student, generator, calib, quant.learn, rng)
    path = request.checkpoint
    if path is not None and path.is_file():
        game.load_state_dict(torch.load(path, weights_only=True))
    checkpoint = None if path is None else lambda: _save_checkpoint(game.state_dict(), path)
    game.play(calib.sam_sga.rounds, checkpoint, request.show_progress)
    return Calibration(generated_set(generator, calib.samples, calib.batch_size, rng), game)
