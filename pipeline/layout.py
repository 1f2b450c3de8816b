"""Every artifact path of a run folder, named once: an :class:`Artifact` is a file or folder in one stage's
folder; the stages write them (into their staging folder), ``inspect`` and ``serve`` read them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
LOCK = ".lock"  # the process id of the run in progress
CALIBRATE_CHECKPOINTS = ".ckpt-calibrate"  # SAM-SGA checkpoints of a running calibrate stage


@dataclass(frozen=True)
class Artifact:
    """``name`` inside the folder of ``stage``."""

    stage: str
    name: str

    def path(self, root: Path) -> Path:
        """Where it lives in the run folder ``root``."""
        return Path(root) / self.stage / self.name


TEACHER_MODEL = Artifact("teacher", "model")
CALIB_INPUTS = Artifact("calibrate", "inputs.safetensors")
CALIB_SAMPLES = Artifact("calibrate", "samples.txt")
STUDENT_STATE = Artifact("calibrate", "student_state.safetensors")
GENERATOR_STATE = Artifact("calibrate", "generator.safetensors")
GAME_HISTORY = Artifact("calibrate", "history.json")
GAME_PLOT = Artifact("calibrate", "loss.png")
TEACHER_ONNX = Artifact("export", "teacher_fp32.onnx")
ORT_DYNAMIC_ONNX = Artifact("export", "teacher_ort_dynamic_int8.onnx")
STUDENT_ONNX = {"trt": Artifact("export", "student_qdq_trt.onnx"), "cpu": Artifact("export", "student_qdq_cpu.onnx")}
ENGINE = Artifact("build", "student.plan")
TIMING_CACHE = Artifact("build", "timing.cache")
BUILD_LOG = Artifact("build", "build.log")
REPORT_JSON = Artifact("validate", "report.json")
REPORT_MD = Artifact("validate", "report.md")
REPORT_PLOT = Artifact("validate", "plot.png")
REPOSITORY = Artifact("package", "model_repository")
SERVE_DIR = Path("serve")  # written by ``serve`` (its log) and ``serve --load-check``, outside the stages
SERVE_REPORT, SERVE_LOAD, SERVE_PLOT = SERVE_DIR / "report.md", SERVE_DIR / "load.json", SERVE_DIR / "load.png"


def int4_weight_only_onnx(group: int) -> Artifact:
    """The CPU model of the teacher with int4 weights in groups of ``group`` (W4A16, MatMulNBits)."""
    return Artifact("export", f"teacher_w4a16_g{group}_cpu.onnx")
