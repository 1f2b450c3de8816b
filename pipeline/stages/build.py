"""Stage 5: TensorRT engine from the TensorRT-flavour Q/DQ graph (only with ``--export trt``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import onnx

from calib.errors import StageUnavailable
from exporters.cpu_kernels import ort_session
from exporters.decoding import graph_cache_layout
from exporters.engine_compare import compare_runners, onnxruntime_runner, random_feeds, tensorrt_runner
from exporters.tensorrt_build import ShapeRange, build_engine, require_tensorrt
from exporters.trt_check import TrtIncompatible, require_trt_compatible
from pipeline.config import PipelineConfig
from pipeline.layout import BUILD_LOG, ENGINE, STUDENT_ONNX, TEACHER_MODEL, TIMING_CACHE
from pipeline.stages.base import Stage, StageContext


class BuildStage(Stage):
    """Writes ``build/student.plan``, ``build/timing.cache`` and ``build/build.log``."""

    name = "build"
    requires = ("teacher", "export")
    reads = ("validate.shapes", "calib.seed")

    def enabled(self, config: PipelineConfig) -> str | None:
        return None if "trt" in config.export.formats else "no TensorRT engine requested (--export trt)"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        onnx_path = ctx.path(STUDENT_ONNX["trt"])
        graphs = ctx.run.shown / STUDENT_ONNX["trt"].stage
        hint = (
            f"the ONNX graphs are in {graphs}; build the engine later on a GPU machine with "
            f"`zsaq-pipeline run CONFIG --out {ctx.run.shown} --resume --export trt`"
        )
        try:
            require_tensorrt()
        except StageUnavailable as exc:
            raise StageUnavailable(f"build: {exc}; {hint}") from None
        if not onnx_path.is_file():
            raise StageUnavailable(f"build: no TensorRT-flavour graph to build ({onnx_path.parent})")
        try:
            require_trt_compatible(onnx.load(str(onnx_path)))
        except TrtIncompatible as exc:
            raise StageUnavailable(f"build: {onnx_path.name} does not suit TensorRT: {exc}") from None
        batches = [b for b, _ in ctx.config.validate.shapes]
        seqs = [s for _, s in ctx.config.validate.shapes]
        shapes = ShapeRange(min=(1, 1), opt=(max(batches), max(seqs)), max=(max(batches), max(seqs)))
        engine = ctx.out / ENGINE.name
        build_engine(onnx_path, engine, ctx.out / TIMING_CACHE.name, ctx.out / BUILD_LOG.name, shapes)
        teacher_config = json.loads((ctx.path(TEACHER_MODEL) / "config.json").read_text())
        comparison = compare_runners(
            onnxruntime_runner(onnx_path, "onnxruntime"),
            tensorrt_runner(engine, "tensorrt"),
            random_feeds(
                ctx.config.validate.shapes,
                teacher_config["vocab_size"],
                ctx.config.calib.seed,
                graph_cache_layout(ort_session(onnx_path)),  # a decoder: prompt and cached-step feeds
            ),
        )
        ctx.log(f"[build] {comparison.describe()}")
        return {
            "engine": ENGINE.name,
            "profile": {"min": shapes.min, "opt": shapes.opt, "max": shapes.max},
            "comparison_with_onnxruntime": asdict(comparison),
        }
