"""Stage 7: a Triton Inference Server model repository (only with ``--export triton``)."""

from __future__ import annotations

from typing import Any

from calib.errors import PipelineError
from calib.models import load_saved_tokenizer
from exporters.triton_repo import RepositorySpec, configured_batching, label_names, serving_limits, write_repository
from pipeline.config import PipelineConfig
from pipeline.layout import ENGINE, REPOSITORY, STUDENT_ONNX, TEACHER_MODEL
from pipeline.stages.base import Stage, StageContext


class PackageStage(Stage):
    """Writes ``package/model_repository/``: the CPU student graph (onnxruntime), the TensorRT engine when one
    was built, and for models with a tokenizer a Python-backend tokenizer and a raw-text ensemble (a causal LM
    exported with its KV cache: a Python-backend model that generates instead); each model in
    ``serve.instances`` instances with the dynamic batcher ``serve`` serves with (``serve.dynamic_batching``, else
    the one the validate stage's measured latencies of the CPU student suggest)."""

    name = "package"
    requires = ("teacher", "export", "build", "validate")  # validate: the measured latencies of the batcher
    reads = ("task", "validate.shapes", "serve")

    def enabled(self, config: PipelineConfig) -> str | None:
        return None if "triton" in config.export.formats else "no Triton repository requested (--export triton)"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from pipeline.serving import validated_latencies  # it reads the validate stage's report: not at import

        config = ctx.config
        onnx_path = ctx.path(STUDENT_ONNX["cpu"])
        if not onnx_path.is_file():
            raise PipelineError(
                f"package: no CPU student graph {onnx_path} (the export stage made none); nothing to serve"
            )
        engine = ctx.path(ENGINE)  # a build folder left from an earlier run with --export trt does not count
        built = "trt" in config.export.formats and engine.is_file()
        plan = (engine, ctx.path(STUDENT_ONNX["trt"])) if built else None
        model_dir = ctx.path(TEACHER_MODEL)
        max_batch, max_length = serving_limits(config.validate.shapes)
        spec = RepositorySpec(
            onnx_path=onnx_path,
            plan=plan,
            tokenizer=load_saved_tokenizer(model_dir),
            task_kind=config.task.kind,
            labels=label_names(model_dir, config.task.num_labels),
            max_batch_size=max_batch,
            max_length=max_length,
            instances=config.serve.instances,
            batching=configured_batching(config.serve, validated_latencies(ctx.run.root), max_batch),
        )
        summary = write_repository(ctx.out / REPOSITORY.name, spec)
        if "note" in summary:
            ctx.log(f"[package] {summary['note']}")
        return {"repository": REPOSITORY.name, **summary}
