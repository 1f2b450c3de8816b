"""Stage 1: load the FP teacher (hub id, folder, package folder or random config) and save it into the run."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from calib.models import TaskModel, count_parameters, load_backbone, load_saved_backbone, load_source_tokenizer
from pipeline.stages.base import Stage, StageContext

MODEL_DIR = "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def load_teacher_tokenizer(ctx: StageContext) -> PreTrainedTokenizerBase | None:
    """The tokenizer the teacher stage saved, or None when the model has none (random models)."""
    folder = ctx.input_dir("teacher") / MODEL_DIR
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def load_teacher(ctx: StageContext) -> TaskModel:
    """The teacher saved by the teacher stage, with its task head, in eval mode and frozen."""
    backbone = load_saved_backbone(ctx.input_dir("teacher") / MODEL_DIR, ctx.config.task)
    teacher = TaskModel(backbone, ctx.config.task.kind).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


class TeacherStage(Stage):
    """Writes ``teacher/model/`` (config, safetensors weights, tokenizer when the source has one)."""

    name = "teacher"
    config_sections = ("model", "task")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        source = ctx.config.model
        backbone = load_backbone(source, ctx.config.task)
        target = ctx.out / MODEL_DIR
        backbone.save_pretrained(str(target), safe_serialization=True)
        has_tokenizer = False
        if source.random is None:
            try:
                tokenizer = load_source_tokenizer(source)
            except (OSError, ValueError):
                ctx.log("[teacher] the model source has no tokenizer: validation runs on generated inputs")
            else:
                tokenizer.save_pretrained(str(target))
                has_tokenizer = True
        return {
            "source": source.describe(),
            "architecture": type(backbone).__name__,
            "parameters": count_parameters(backbone),
            "tokenizer": has_tokenizer,
        }
