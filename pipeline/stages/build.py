"""Stage 5: TensorRT engine from the TensorRT-flavour Q/DQ graph (only with ``--export trt``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import onnx

from exporters.engine_compare import compare_runners, onnxruntime_runner, random_feeds, tensorrt_runner
from exporters.tensorrt_build import ShapeRange, build_engine, require_tensorrt
from exporters.trt_check import TrtIncompatible, require_trt_compatible
from pipeline.config import PipelineConfig
from pipeline.errors import StageUnavailable
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.export import STUDENT_ONNX
from pipeline.stages.teacher import MODEL_DIR

ENGINE = "student.plan"


class BuildStage(Stage):
    """Writes ``build/student.plan``, ``build/timing.cache`` and ``build/build.log``."""

    name = "build"
    requires = ("teacher", "export")
    config_sections = ("model", "task", "calib", "quant", "export", "validate")

    def enabled(self, config: PipelineConfig) -> str | None:
        return None if "trt" in config.export.formats else "no TensorRT engine requested (--export trt)"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        onnx_path = ctx.input_dir("export") / STUDENT_ONNX["trt"]
        hint = (
            f"the ONNX graphs are in {ctx.input_dir('export')}; build the engine later on a GPU machine with "
            f"`zsaq-pipeline run CONFIG --out {ctx.run.root} --resume --export trt`"
        )
        try:
            require_tensorrt()
        except StageUnavailable as exc:
            raise StageUnavailable(f"build: {exc}; {hint}") from None
        if not onnx_path.is_file():
            raise StageUnavailable(f"build: no TensorRT-flavour graph to build ({ctx.input_dir('export')})")
        try:
            require_trt_compatible(onnx.load(str(onnx_path)))
        except TrtIncompatible as exc:
            raise StageUnavailable(f"build: {onnx_path.name} does not suit TensorRT: {exc}") from None
        batches = [b for b, _ in ctx.config.validate.shapes]
        seqs = [s for _, s in ctx.config.validate.shapes]
        shapes = ShapeRange(min=(1, 1), opt=(max(batches), max(seqs)), max=(max(batches), max(seqs)))
        build_engine(onnx_path, ctx.out / ENGINE, ctx.out / "timing.cache", ctx.out / "build.log", shapes)
        teacher_config = json.loads((ctx.input_dir("teacher") / MODEL_DIR / "config.json").read_text())
        comparison = compare_runners(
            onnxruntime_runner(onnx_path, "onnxruntime"),
            tensorrt_runner(ctx.out / ENGINE, "tensorrt"),
            random_feeds(ctx.config.validate.shapes, teacher_config["vocab_size"], ctx.config.calib.seed),
        )
        ctx.log(f"[build] {comparison.describe()}")
        return {
            "engine": ENGINE,
            "profile": {"min": shapes.min, "opt": shapes.opt, "max": shapes.max},
            "comparison_with_onnxruntime": asdict(comparison),
        }
