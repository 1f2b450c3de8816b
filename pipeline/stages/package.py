"""Stage 7: a Triton Inference Server model repository (only with ``--export triton``)."""

from __future__ import annotations

from typing import Any

from exporters.triton_repo import RepositorySpec, label_names, load_tokenizer, serving_limits, write_repository
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.build import ENGINE
from pipeline.stages.export import STUDENT_ONNX
from pipeline.stages.teacher import MODEL_DIR

REPOSITORY = "model_repository"


class PackageStage(Stage):
    """Writes ``package/model_repository/``: the CPU student graph (onnxruntime), the TensorRT engine when one
    was built, and for models with a tokenizer a Python-backend tokenizer and a raw-text ensemble."""

    name = "package"
    requires = ("teacher", "export", "validate")
    config_sections = ("model", "task", "calib", "quant", "export", "validate")

    def enabled(self, config: PipelineConfig) -> str | None:
        return None if "triton" in config.export.formats else "no Triton repository requested (--export triton)"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        config = ctx.config
        export_dir = ctx.input_dir("export")
        onnx_path = export_dir / STUDENT_ONNX["cpu"]
        if not onnx_path.is_file():
            raise PipelineError(
                f"package: no CPU student graph {onnx_path} (the export stage made none); nothing to serve"
            )
        engine = ctx.input_dir("build") / ENGINE
        plan = (
            (engine, export_dir / STUDENT_ONNX["trt"]) if "trt" in config.export.formats and engine.is_file() else None
        )
        model_dir = ctx.input_dir("teacher") / MODEL_DIR
        max_batch, max_length = serving_limits(config.validate.shapes)
        spec = RepositorySpec(
            onnx_path=onnx_path,
            plan=plan,
            tokenizer=load_tokenizer(model_dir),
            task_kind=config.task.kind,
            labels=label_names(model_dir, config.task.num_labels),
            max_batch_size=max_batch,
            max_length=max_length,
        )
        summary = write_repository(ctx.out / REPOSITORY, spec)
        if "note" in summary:
            ctx.log(f"[package] {summary['note']}")
        return {"repository": REPOSITORY, **summary}
