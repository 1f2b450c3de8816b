"""The registries of calibration methods and generator kinds: adding one is its own module plus one line here.
Entries name their implementation as ``"module:function"``, imported on first use: checking a config
imports no torch. Model families are registered in :mod:`calib.families`, export flavours in
:data:`exporters.onnx_qdq.FLAVOURS`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Registered:
    """An implementation named by ``"module:attribute"``, imported on first use."""

    target: str

    def load(self) -> Callable[..., Any]:
        """The implementation itself."""
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class CalibrationMethod(Registered):
    """``target(CalibrationRequest) -> Calibration`` (:mod:`calib.methods`); ``trains_student``: it learns the
    student too (its output depends on ``quant``); ``uses_data``: it reads task data (an upper bound, flagged)."""

    trains_student: bool = False
    uses_data: bool = False
    teacher_kinds: tuple[str, ...] = ("embedding", "classification", "causal-lm")


@dataclass(frozen=True)
class GeneratorKind(Registered):
    """``target(calib, teacher, special_ids, tokenizer) -> generator``; ``needs_lm``: it reads text a causal LM
    writes (``calib.generator.model``, or a causal-LM teacher)."""

    needs_lm: bool = False


METHODS: dict[str, CalibrationMethod] = {
    "zsaq": CalibrationMethod("calib.zsaq:calibrate_zsaq", trains_student=True),
    "random-tokens": CalibrationMethod("calib.inputs:random_token_inputs"),
    "gaussian-embeds": CalibrationMethod("calib.inputs:gaussian_embed_inputs"),
    "teacher-sampled": CalibrationMethod("calib.lm_text:sampled_inputs", teacher_kinds=("causal-lm",)),
    "real-data": CalibrationMethod("calib.task_data:real_data_inputs", uses_data=True),
}

GENERATORS: dict[str, GeneratorKind] = {
    "soft-tokens": GeneratorKind("calib.generators.soft_tokens:build"),
    "lm-adapter": GeneratorKind("calib.generators.lm_adapter:build", needs_lm=True),
}
