"""Stage 3: the quantized student: insert quantizers, initialise ranges, learn step sizes, write the contract."""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file

from calib.contract import build_contract, save_contract
from calib.inputs import CalibrationSet
from calib.learn import learn_quantizers
from calib.student import build_student, init_ranges, load_student_state, quant_layers
from pipeline.config import PipelineConfig
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.calibrate import INPUTS_FILE, STUDENT_STATE
from pipeline.stages.teacher import load_teacher


def load_calibration_inputs(ctx: StageContext) -> CalibrationSet:
    """The inputs the calibrate stage wrote."""
    return CalibrationSet.from_tensors(load_file(str(ctx.input_dir("calibrate") / INPUTS_FILE)))


def quant_label(config: PipelineConfig) -> str:
    """W8A8, W4A8, W4A16 ... with the group size when there is one."""
    w = config.quant.weights
    group = f"g{w.group_size}" if w.group_size else ""
    return f"W{w.bits}{group}A{config.quant.activations.bits}"


class QuantizeStage(Stage):
    """Writes ``quantize/contract.safetensors`` and ``quantize/contract.json``."""

    name = "quantize"
    requires = ("teacher", "calibrate")
    config_sections = ("model", "task", "calib", "quant")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config
        torch.manual_seed(config.calib.seed)
        teacher = load_teacher(ctx)
        batches = load_calibration_inputs(ctx).batches(config.calib.batch_size)
        student = build_student(teacher, config.quant)
        state_file = ctx.input_dir("calibrate") / STUDENT_STATE
        if state_file.is_file():  # zsaq: SAM-SGA already learned the quantizers
            load_student_state(student, load_file(str(state_file)))
        else:
            init_ranges(student, config.quant, batches)
        result = learn_quantizers(teacher, student, batches, config.quant.learn, ctx.show_progress)
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
