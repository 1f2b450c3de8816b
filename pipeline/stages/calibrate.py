"""Stage 2: data-free calibration by the configured method (:data:`calib.registry.METHODS`). ``zsaq`` trains a
generator against the student (SAM-SGA); the baselines make inputs without learning. Only a method that
uses data (``real-data``) reads task data, and every report flags it."""

from __future__ import annotations

import json
import shutil
from typing import Any

from safetensors.torch import save_file

from calib.inputs import CalibrationSet
from calib.methods import CalibrationRequest, calibrate
from calib.models import embedding_table, nearest_tokens
from calib.registry import METHODS
from calib.task_data import REAL_DATA_FLAG
from calib.zsaq import game_student_state
from pipeline.config import PipelineConfig
from pipeline.layout import (
    CALIB_INPUTS,
    CALIB_SAMPLES,
    CALIBRATE_CHECKPOINTS,
    GAME_HISTORY,
    GAME_PLOT,
    GENERATOR_STATE,
    STUDENT_STATE,
)
from pipeline.report import plot_losses
from pipeline.stages.base import Stage, StageContext

SAMPLES_SHOWN = 16


def decoded_samples(samples: CalibrationSet, tokenizer: Any, table: Any) -> str:
    """The first samples as text: token ids as they are, or the nearest vocabulary rows of embeddings."""
    lines = []
    for i in range(min(SAMPLES_SHOWN, len(samples))):
        length = int(samples.attention_mask[i].sum())
        if samples.input_ids is not None:
            ids = samples.input_ids[i, :length]
        else:
            ids = nearest_tokens(samples.inputs_embeds[i, :length], table)
        text = tokenizer.decode(ids.tolist()) if tokenizer is not None else " ".join(map(str, ids.tolist()))
        lines.append(f"[{i}] ({length} tokens) {text}")
    return "\n".join(lines) + "\n"


class CalibrateStage(Stage):
    """Writes the calibration inputs and samples.txt and, for a method that trains the student (zsaq), the
    student state, generator, history and loss plot."""

    name = "calibrate"
    requires = ("teacher",)
    reads = ("task.kind", "calib")
    collective = True

    def config_keys(self, config: PipelineConfig) -> tuple[str, ...]:
        """A method that trains the student also depends on ``quant``."""
        return self.reads + (("quant",) if METHODS[config.calib.method].trains_student else ())

    def run(self, ctx: StageContext) -> dict[str, Any]:
        config, calib = ctx.config, ctx.config.calib
        teacher, tokenizer = ctx.teacher(), ctx.tokenizer()
        parallel, device = ctx.parallel, ctx.device()
        checkpoints = ctx.run.root / CALIBRATE_CHECKPOINTS
        if parallel.is_main:
            checkpoints.mkdir(exist_ok=True)
        # a changed config, or another stream count, never resumes a stale game
        checkpoint = checkpoints / f"{ctx.fingerprint[:16]}-streams{parallel.streams}.pt"
        request = CalibrationRequest(
            teacher, tokenizer, calib, config.quant, config.task, checkpoint, ctx.show_progress, parallel, str(device)
        )
        calibration = calibrate(request)
        if not parallel.is_main:
            return {}  # the other ranks helped play; rank 0 writes
        samples, game = calibration.samples, calibration.game
        if game is not None:  # their states are artifacts: on the CPU
            game.student.cpu()
            game.generator.cpu()
        summary: dict[str, Any] = {
            "method": calib.method, "samples": calib.samples, "seq_len": calib.seq_len, "device": str(device)
        }  # fmt: skip
        if parallel.world_size > 1 or parallel.streams > 1:
            summary.update(processes=parallel.world_size, streams=parallel.streams)
        if game is not None:
            state = game_student_state(game.student, calib, config.quant.learn)
            save_file(state, str(ctx.out / STUDENT_STATE.name))
            save_file(
                {k: v.contiguous() for k, v in game.generator.state_dict().items()},
                str(ctx.out / GENERATOR_STATE.name),
            )
            history = vars(game.history)
            losses = {k: v for k, v in history.items() if isinstance(v, list)}  # timings go to the manifest
            (ctx.out / GAME_HISTORY.name).write_text(json.dumps(losses) + "\n", encoding="utf-8")
            plot_losses(history, ctx.out / GAME_PLOT.name, f"SAM-SGA on {config.model.describe()}")
            summary.update(
                generator=calib.generator.kind,
                rounds=calib.sam_sga.rounds,
                sam=calib.sam_sga.sam,
                adversarial=calib.sam_sga.adversarial,
                final_student_discrepancy=round(history["student_discrepancy"][-1], 6),
                selected_round=history["selected_round"],
                seconds_generator=round(history["generator_seconds"], 2),
                seconds_student=round(history["student_seconds"], 2),
            )
            if calib.sharpness.enabled:
                summary["seconds_sharpness_aware"] = round(history["sharpness_seconds"], 2)
        if METHODS[calib.method].uses_data:
            summary["flag"] = REAL_DATA_FLAG
            ctx.log(f"[calibrate] {REAL_DATA_FLAG}")
        shutil.rmtree(checkpoints, ignore_errors=True)
        save_file(samples.tensors(), str(ctx.out / CALIB_INPUTS.name))
        text = decoded_samples(samples, tokenizer, embedding_table(teacher))
        (ctx.out / CALIB_SAMPLES.name).write_text(text, encoding="utf-8")
        summary["mean_length"] = round(float(samples.attention_mask.sum(1).float().mean()), 2)
        return summary
