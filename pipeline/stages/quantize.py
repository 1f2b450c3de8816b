"""Stage 3: the quantized student (:func:`calib.methods.quantize_student`) and its export contract."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file

from calib.contract import build_contract, save_contract
from calib.inputs import CalibrationSet
from calib.methods import quantize_student
from calib.student import quant_layers
from pipeline.config import PipelineConfig
from pipeline.layout import CALIB_INPUTS, STUDENT_STATE
from pipeline.stages.base import Stage, StageContext


def quant_label(config: PipelineConfig) -> str:
    """W8A8, W4A8, W4A16 ... with the group size when there is one."""
    w = config.quant.weights
    group = f"g{w.group_size}" if w.group_size else ""
    return f"W{w.bits}{group}A{config.quant.activations.bits}"


class QuantizeStage(Stage):
    """Writes ``quantize/contract.safetensors`` and ``quantize/contract.json``."""

    name = "quantize"
    requires = ("teacher", "calibrate")
    reads = ("calib.seed", "calib.batch_size", "calib.streams", "quant")
    collective = True

    def run(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config
        torch.manual_seed(config.calib.seed)
        teacher = ctx.teacher()
        batches = CalibrationSet.from_tensors(load_file(str(ctx.path(CALIB_INPUTS)))).batches(config.calib.batch_size)
        state_file = ctx.path(STUDENT_STATE)  # a method that trained the student (zsaq) left its state
        state = load_file(str(state_file)) if state_file.is_file() else None
        parallel, device = ctx.parallel, ctx.device()
        student, result = quantize_student(
            teacher, config.quant, batches, state, ctx.show_progress and parallel.is_main, parallel, str(device)
        )
        if not parallel.is_main:
            return {}
        student.cpu()  # the contract is an artifact
        save_contract(build_contract(student), ctx.out)
        summary: dict[str, Any] = {
            "scheme": quant_label(config),
            "quantized_layers": len(quant_layers(student)),
            "weight_init": config.quant.weights.init,
            "activation_init": config.quant.activations.init,
            "learning_steps": len(result.losses),
        }
        if result.losses:
            summary["loss_first"] = round(result.losses[0], 6)
            summary["loss_last"] = round(result.losses[-1], 6)
        if result.stopped_early:
            summary["stopped_early"] = result.stopped_early
        return summary
