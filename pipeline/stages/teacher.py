"""Stage 1: load the FP teacher (hub id, folder, package folder or random config) and save it into the run."""

from __future__ import annotations

from typing import Any

from calib.models import count_parameters, load_backbone, load_source_tokenizer, source_digest
from pipeline.config import PipelineConfig
from pipeline.layout import TEACHER_MODEL
from pipeline.stages.base import Stage, StageContext


class TeacherStage(Stage):
    """Writes ``teacher/model/`` (config, safetensors weights, tokenizer when the source has one)."""

    name = "teacher"
    reads = ("model", "task.kind", "task.num_labels")

    def outside_inputs(self, config: PipelineConfig) -> str:
        """The source model's bytes (or its package's version): changed weights re-run everything."""
        return source_digest(config.model)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        source = ctx.config.model
        backbone = load_backbone(source, ctx.config.task)
        target = ctx.out / TEACHER_MODEL.name
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
