"""The two calls that make every quantized model: :func:`calibrate` (the registered method's inputs; ZSAQ
also learns the student) and :func:`quantize_student`. Stages, benchmark cells and scripts use them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calib.errors import ConfigError
from calib.parallel import SINGLE, Parallel
from calib.registry import METHODS

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from calib.config import CalibConfig, QuantConfig, TaskConfig
    from calib.inputs import Batch, CalibrationSet
    from calib.learn import LearnResult
    from calib.models import TaskModel
    from calib.sam_sga import SamSga


@dataclass
class CalibrationRequest:
    """What a calibration method may use. ``checkpoint``: where a long method saves its progress (and
    resumes from, when the file exists); ``task`` says how task text is read (real data only); ``parallel``:
    this process's place in a data-parallel run (methods that learn use it); ``device``: a torch device name."""

    teacher: TaskModel
    tokenizer: PreTrainedTokenizerBase | None
    calib: CalibConfig
    quant: QuantConfig
    task: TaskConfig
    checkpoint: Path | None = None
    show_progress: bool = True
    parallel: Parallel = SINGLE
    device: str = "cpu"  # where a method that learns plays (calib.devices)


@dataclass
class Calibration:
    """The calibration set, and for a method that trains the student (ZSAQ) the game that did."""

    samples: CalibrationSet
    game: SamSga | None = None


def calibrate(request: CalibrationRequest) -> Calibration:
    """Run ``request.calib.method``."""
    method = METHODS[request.calib.method]
    if request.teacher.kind not in method.teacher_kinds:
        kinds = " or ".join(method.teacher_kinds)
        raise ConfigError(f"calib.method: {request.calib.method} needs a {kinds} teacher, not {request.teacher.kind}")
    return method.load()(request)


def quantize_student(
    teacher: TaskModel,
    quant: QuantConfig,
    batches: list[Batch],
    state: dict[str, torch.Tensor] | None = None,
    show_progress: bool = True,
    parallel: Parallel = SINGLE,
    device: str = "cpu",
) -> tuple[TaskModel, LearnResult]:
    """The quantized student: quantizers inserted, then either a learned ``state`` restored (what ZSAQ's game
    learned) or ranges initialised on ``batches``; GPTQ rounding if asked; then ``quant.learn`` steps, data
    parallel over ``parallel``'s ranks (range initialisation and GPTQ run whole on every rank: they are
    deterministic, so every rank starts from the same student). On a GPU ``device`` the student stays
    float32 and the teacher is frozen in bfloat16; the student comes back on ``device``."""
    import torch

    from calib.devices import frozen_on
    from calib.gptq import apply_gptq
    from calib.learn import learn_quantizers
    from calib.student import build_student, init_ranges, load_student_state

    place = torch.device(device)
    student = build_student(teacher, quant).to(place)  # from the float32 teacher, before it changes precision
    teacher = frozen_on(teacher, place)
    batches = [batch.to(place) for batch in batches]
    if state is not None:
        load_student_state(student, state)
    else:
        init_ranges(student, quant, batches)
    if quant.weights.rounding == "gptq":
        apply_gptq(student, batches)
    result = learn_quantizers(teacher, student, batches, quant.learn, show_progress, parallel)
    return student, result


def int4_weight_only_quant(teacher: TaskModel, group: int) -> QuantConfig:
    """Round-to-nearest int4 weights per group (min-max), int8 embedding rows unless tied to an LM head.

    Weight-only quantization needs no activation ranges, hence no calibration inputs: the student path
    is reused with 16-bit activations so the numbers still come from a contract."""
    from calib.config import ActivationQuant, QuantConfig, WeightQuant

    tied = teacher.kind == "causal-lm" and getattr(teacher.backbone.config, "tie_word_embeddings", False)
    return QuantConfig(
        weights=WeightQuant(bits=4, granularity="per-group", group_size=group),
        activations=ActivationQuant(bits=16),
        embedding_bits=None if tied else 8,
    )
