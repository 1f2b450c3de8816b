"""Where calibration and quantizer learning run: the CPU, or a CUDA GPU (``calib.device``), and in what
precision: the frozen teacher in bfloat16 on GPUs (half the memory and the time of its passes), the student and
its fake quantization in float32 everywhere (its gradients need it)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from calib.errors import ConfigError

if TYPE_CHECKING:
    from calib.models import TaskModel


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (this rank's GPU) or ``auto`` (CUDA when torch sees a GPU)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("calib.device: cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def teacher_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs, float32 on the CPU (where bfloat16 matmuls are not faster everywhere)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def frozen_on(teacher: TaskModel, device: torch.device) -> TaskModel:
    """The frozen teacher on ``device`` in its precision there: itself on the CPU, else a copy. ``Module.to``
    works in place: moving the caller's teacher would hand the next stage of the same process (quantize after
    calibrate) a bfloat16 GPU teacher, and a student built from it in bfloat16."""
    if device.type == "cpu":
        return teacher
    return copy.deepcopy(teacher).to(device=device, dtype=teacher_dtype(device))
