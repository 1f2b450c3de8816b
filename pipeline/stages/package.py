"""Stage 7: a Triton Inference Server model repository (only with ``--export triton``)."""

from __future__ import annotations

from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import StageUnavailable
from pipeline.stages.base import Stage, StageContext


class PackageStage(Stage):
    """Triton packaging is tracked in its own issue; until it lands the stage says so and exits non-zero."""

    name = "package"
    requires = ("export", "validate")
    config_sections = ("model", "task", "calib", "quant", "export", "validate")

    def enabled(self, config: PipelineConfig) -> str | None:
        return None if "triton" in config.export.formats else "no Triton repository requested (--export triton)"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        raise StageUnavailable(
            "package: Triton model repositories are not produced by this version yet; "
            f"the ONNX models in {ctx.input_dir('export')} load in Triton's onnxruntime backend as they are"
        )
