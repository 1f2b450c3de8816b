"""The stages, in the order they run."""

from pipeline.stages.base import Stage
from pipeline.stages.build import BuildStage
from pipeline.stages.calibrate import CalibrateStage
from pipeline.stages.export import ExportStage
from pipeline.stages.package import PackageStage
from pipeline.stages.quantize import QuantizeStage
from pipeline.stages.teacher import TeacherStage
from pipeline.stages.validate import ValidateStage

STAGES: tuple[Stage, ...] = (
    TeacherStage(),
    CalibrateStage(),
    QuantizeStage(),
    ExportStage(),
    BuildStage(),
    ValidateStage(),
    PackageStage(),
)
