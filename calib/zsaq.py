"""ZSAQ calibration end to end: build the generator, initialise the student on its first samples, play
SAM-SGA (with checkpoints), and hand back the calibration set the generator ends up producing."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from calib.config import CalibConfig, LearnConfig
from calib.devices import frozen_on
from calib.errors import ConfigError
from calib.generator_choice import resolve_generator
from calib.gptq import apply_gptq
from calib.inputs import AnchorSource, Batch, CalibrationSet, random_token_source, special_token_ids
from calib.methods import Calibration, CalibrationRequest
from calib.models import TaskModel
from calib.registry import GENERATORS
from calib.sam_sga import SamSga
from calib.student import build_student, init_ranges, student_state


def build_generator(
    calib: CalibConfig,
    teacher: TaskModel,
    special_ids: tuple[int, ...],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> torch.nn.Module:
    """The configured generator kind, deterministic under ``calib.seed``. ``tokenizer`` is the teacher's (a
    generator reading another model's text needs it)."""
    generator = resolve_generator(calib.generator, teacher.kind, tokenizer is not None)[0]
    calib = dataclasses.replace(calib, generator=generator)  # ``auto`` in a config built in code
    torch.manual_seed(calib.seed)
    return GENERATORS[generator.kind].load()(calib, teacher, special_ids, tokenizer)


@torch.no_grad()
def generated_set(generator: torch.nn.Module, samples: int, batch_size: int, rng: torch.Generator) -> CalibrationSet:
    """``samples`` detached pseudo-inputs from the generator."""
    batches: list[Batch] = [generator.sample(min(batch_size, samples - i), rng) for i in range(0, samples, batch_size)]
    return CalibrationSet(
        torch.cat([b.attention_mask for b in batches]), inputs_embeds=torch.cat([b.inputs_embeds for b in batches])
    )


def anchor_source(
    calib: CalibConfig, teacher: TaskModel, tokenizer: PreTrainedTokenizerBase | None, generator: torch.nn.Module
) -> AnchorSource:
    """The inputs ``calib.sam_sga.anchor_inputs`` names: random tokens of the teacher's vocabulary, or the
    lm-adapter's text as its LM wrote it (the generator's, before the adapter moves it)."""
    if calib.sam_sga.anchor_inputs == "random-tokens":
        return random_token_source(teacher, tokenizer, calib.seq_len)
    text = getattr(generator, "text", None)
    if text is None:
        raise ConfigError("calib.sam_sga.anchor_inputs: lm-text needs the lm-adapter generator (calib.generator.kind)")
    return text


def anchor_start(anchor: AnchorSource, samples: int, batch_size: int, rng: torch.Generator) -> list[Batch]:
    """``samples`` anchor inputs in batches: what the start's ranges and GPTQ see beside the generator's."""
    return [anchor.sample(min(batch_size, samples - i), rng) for i in range(0, samples, batch_size)]


def game_student_state(student: TaskModel, calib: CalibConfig, learn: LearnConfig) -> dict[str, torch.Tensor]:
    """What the game's student hands on to quantize: its learned quantizers, and its weights wherever they are
    its own (learned, or GPTQ's rounding the game started from); otherwise quantize rebuilds the teacher's."""
    own_weights = "weights" in learn.params or calib.sam_sga.start == "gptq"
    return student_state(student, include_weights=own_weights)


def _save_checkpoint(state: dict, path: Path) -> None:
    """Through a temporary name: a process killed while saving leaves the previous checkpoint whole."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def calibrate_zsaq(request: CalibrationRequest) -> Calibration:
    """Play SAM-SGA, resuming from ``request.checkpoint`` when it exists (and saving there every N rounds,
    from rank 0); returns the final calibration set and the game (its student, generator and history).

    Every rank builds the same generator and student and initialises ranges (and, with ``sam_sga.start:
    gptq``, rounds the weights by GPTQ) on the same samples (drawn with stream 0's generator, which rank 0 then
    continues), so the ranks start equal and stay equal."""
    calib, quant, parallel = request.calib, request.quant, request.parallel
    device = torch.device(request.device)
    rng = torch.Generator(device).manual_seed(calib.seed)
    generator = build_generator(calib, request.teacher, special_token_ids(request.tokenizer)[0], request.tokenizer)
    generator = generator.to(device)
    student = build_student(request.teacher, quant).to(device)  # float32, before the teacher changes precision
    teacher = frozen_on(request.teacher, device)
    first = generated_set(generator, calib.samples, calib.batch_size, rng).batches(calib.batch_size)
    anchor = None
    if calib.sam_sga.anchor:
        anchor = anchor_source(calib, request.teacher, request.tokenizer, generator)
        first += anchor_start(anchor, calib.samples, calib.batch_size, rng)  # on the rng's device
    init_ranges(student, quant, first)
    if calib.sam_sga.start == "gptq":
        apply_gptq(student, first)  # deterministic: every rank starts from the same rounding
    game = SamSga(teacher, student, generator, calib, quant.learn, rng, parallel, anchor)
    path = request.checkpoint
    if path is not None and path.is_file():
        game.load_state_dict(torch.load(path, weights_only=True))

    def checkpoint() -> None:
        state = game.state_dict()  # on every rank: it gathers the streams' random states
        if parallel.is_main:
            _save_checkpoint(state, path)

    game.play(calib.sam_sga.rounds, None if path is None else checkpoint, request.show_progress and parallel.is_main)
    # the set the generator ends up producing, drawn by stream 0's owner: every rank learns on the same set
    samples = None
    if parallel.is_main:  # on the CPU: it is an artifact
        samples = CalibrationSet.from_tensors(generated_set(generator, calib.samples, calib.batch_size, rng).tensors())
    return Calibration(parallel.broadcast(samples), game)
