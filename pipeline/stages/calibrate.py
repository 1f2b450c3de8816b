"""Stage 2: data-free calibration. ``zsaq`` trains a generator against the student (SAM-SGA); the
baselines make inputs without learning. Only ``real-data`` reads task data, and every report flags it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from calib.generators import embedding_table, nearest_tokens
from calib.inputs import CalibrationSet, gaussian_embeds, random_tokens
from calib.models import TaskModel
from calib.sampling import sample_sequences
from calib.student import student_state
from calib.zsaq import calibrate_zsaq
from exporters.eval_data import load_eval_set
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.plots import plot_losses
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.teacher import load_teacher, load_teacher_tokenizer

INPUTS_FILE = "inputs.safetensors"
STUDENT_STATE = "student_state.safetensors"
SAMPLES_SHOWN = 16
REAL_DATA_FLAG = "uses REAL TASK DATA: an upper bound for benchmarks, not a data-free result"


def special_token_ids(tokenizer: PreTrainedTokenizerBase | None) -> tuple[tuple[int, ...], int]:
    """(special and unused ids to avoid, pad id); nothing to avoid without a tokenizer."""
    if tokenizer is None:
        return (), 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    specials = set(tokenizer.all_special_ids)
    specials.update(i for tok, i in tokenizer.get_vocab().items() if tok.startswith("[unused"))
    return tuple(sorted(specials)), pad


def real_data_set(config: PipelineConfig, tokenizer: PreTrainedTokenizerBase | None) -> CalibrationSet:
    """``calib.samples`` examples drawn (seeded) from the task file ``calib.real_data``, tokenized as the
    model reads them: sentence pairs together for a classifier, each sentence alone for an embedding model."""
    if tokenizer is None:
        raise ConfigError("calib.real_data: the model has no tokenizer to read task text")
    path = Path(config.calib.real_data)
    if not path.is_file():
        raise ConfigError(f"calib.real_data: no file at {path}")
    data = load_eval_set(path, "accuracy", None)
    pairs = bool(data.texts_b) and config.task.kind != "embedding"
    texts = data.texts_a if pairs or not data.texts_b else data.texts_a + data.texts_b
    generator = torch.Generator().manual_seed(config.calib.seed)
    picked = torch.randperm(len(texts), generator=generator)[: config.calib.samples].tolist()
    enc = tokenizer(
        [texts[i] for i in picked], [data.texts_b[i] for i in picked] if pairs else None,
        padding="max_length", truncation=True, max_length=config.calib.seq_len, return_tensors="pt",
    )  # fmt: skip
    return CalibrationSet(enc["attention_mask"].long(), input_ids=enc["input_ids"].long())


def baseline_inputs(
    config: PipelineConfig, teacher: TaskModel, tokenizer: PreTrainedTokenizerBase | None
) -> CalibrationSet:
    """The fixed inputs of a method without a generator (every method but zsaq)."""
    calib = config.calib
    specials, pad = special_token_ids(tokenizer)
    table = embedding_table(teacher)
    if calib.method == "random-tokens":
        return random_tokens(calib.samples, calib.seq_len, len(table), calib.seed, specials, pad)
    if calib.method == "gaussian-embeds":
        return gaussian_embeds(calib.samples, calib.seq_len, table, calib.seed)
    if calib.method == "teacher-sampled":
        if teacher.kind != "causal-lm":
            raise ConfigError("calib.method: teacher-sampled needs a causal-LM teacher (task.kind: causal-lm)")
        ids = sample_sequences(teacher.backbone, calib.samples, calib.seq_len, calib.seed)
        return CalibrationSet(torch.ones_like(ids), input_ids=ids)
    return real_data_set(config, tokenizer)


def _save_checkpoint(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _decoded_samples(samples: CalibrationSet, tokenizer, table: torch.Tensor) -> str:  # noqa: ANN001
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
    """Writes ``inputs.safetensors``, ``samples.txt`` and, for zsaq, the student state, generator, history
    and loss plot."""

    name = "calibrate"
    requires = ("teacher",)
    config_sections = ("model", "task", "calib")

    def sections(self, config: PipelineConfig) -> tuple[str, ...]:
        """zsaq trains the quantized student, so its output also depends on ``quant``."""
        return self.config_sections + (("quant",) if config.calib.method == "zsaq" else ())

    def run(self, ctx: StageContext) -> dict[str, Any]:
        config, calib = ctx.config, ctx.config.calib
        teacher = load_teacher(ctx)
        tokenizer = load_teacher_tokenizer(ctx)
        specials, pad = special_token_ids(tokenizer)
        table = embedding_table(teacher)
        summary: dict[str, Any] = {"method": calib.method, "samples": calib.samples, "seq_len": calib.seq_len}
        if calib.method == "zsaq":
            checkpoint_dir = ctx.run.root / ".ckpt-calibrate"
            checkpoint_dir.mkdir(exist_ok=True)
            checkpoint = checkpoint_dir / f"{self.fingerprint(config)[:16]}.pt"
            game, samples = calibrate_zsaq(
                config, teacher, specials, checkpoint, _save_checkpoint, ctx.show_progress, tokenizer
            )
            save_file(student_state(game.student, "weights" in config.quant.learn.params), str(ctx.out / STUDENT_STATE))
            save_file(
                {k: v.contiguous() for k, v in game.generator.state_dict().items()},
                str(ctx.out / "generator.safetensors"),
            )
            history = vars(game.history)
            losses = {k: v for k, v in history.items() if isinstance(v, list)}  # timings go to the manifest
            (ctx.out / "history.json").write_text(json.dumps(losses) + "\n", encoding="utf-8")
            plot_losses(history, ctx.out / "loss.png", f"SAM-SGA on {config.model.describe()}")
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            summary.update(
                generator=calib.generator.kind,
                rounds=calib.sam_sga.rounds,
                sam=calib.sam_sga.sam,
                adversarial=calib.sam_sga.adversarial,
                final_student_discrepancy=round(history["student_discrepancy"][-1], 6),
                seconds_generator=round(history["generator_seconds"], 2),
                seconds_student=round(history["student_seconds"], 2),
            )
            if calib.sharpness.enabled:
                summary["seconds_sharpness_aware"] = round(history["sharpness_seconds"], 2)
        else:
            samples = baseline_inputs(config, teacher, tokenizer)
            if calib.method == "real-data":
                summary["flag"] = REAL_DATA_FLAG
                ctx.log(f"[calibrate] {REAL_DATA_FLAG}")
        save_file(samples.tensors(), str(ctx.out / INPUTS_FILE))
        (ctx.out / "samples.txt").write_text(_decoded_samples(samples, tokenizer, table), encoding="utf-8")
        summary["mean_length"] = round(float(samples.attention_mask.sum(1).float().mean()), 2)
        return summary
