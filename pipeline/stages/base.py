"""What a stage is: a name, the stages whose artifacts it reads, the config keys it reads, and a run method.
That declaration is its fingerprint (:meth:`Stage.fingerprint`), which ``--resume`` compares."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from calib.parallel import SINGLE, Parallel
from pipeline.config import PipelineConfig
from pipeline.layout import TEACHER_MODEL, Artifact
from pipeline.runfolder import RunFolder

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from calib.models import TaskModel


@dataclass
class StageContext:
    """Everything a running stage may touch: the config, earlier stages' folders, its own staging folder, and
    its place in a data-parallel run (only rank 0's staging folder is committed)."""

    config: PipelineConfig
    run: RunFolder
    out: Path
    fingerprint: str
    show_progress: bool = True
    parallel: Parallel = SINGLE

    def path(self, artifact: Artifact) -> Path:
        """An earlier stage's committed artifact."""
        return artifact.path(self.run.root)

    def teacher(self) -> TaskModel:
        """The frozen FP teacher the teacher stage saved, with its task head."""
        from calib.models import frozen_teacher, load_saved_backbone

        task = self.config.task
        return frozen_teacher(load_saved_backbone(self.path(TEACHER_MODEL), task), task.kind)

    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The tokenizer the teacher stage saved, or None when the model has none (random models)."""
        from calib.models import load_saved_tokenizer

        return load_saved_tokenizer(self.path(TEACHER_MODEL))

    def device(self) -> torch.device:
        """Where calibrate and quantize run (``calib.device``; a data-parallel rank takes its own GPU)."""
        from calib.devices import resolve_device

        return resolve_device(self.config.calib.device, self.parallel.local_rank)

    def log(self, message: str) -> None:
        """A progress line for the person watching."""
        if self.show_progress:
            print(message, flush=True)


def config_value(data: dict[str, Any], key: str) -> Any:
    """The value at a dotted key (``export.opset``) of a config's plain dict."""
    for part in key.split("."):
        data = data[part]
    return data


def output_digest(entry: dict[str, Any] | None) -> str:
    """What a stage left for the stages that read it: its artifacts' hashes when done, else its status."""
    if not entry or entry.get("status") != "done":
        return (entry or {}).get("status", "pending")
    return hashlib.sha256(json.dumps(entry.get("artifacts", {}), sort_keys=True).encode()).hexdigest()


class Stage:
    """Base class: subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()  # stages whose artifacts this one reads
    reads: ClassVar[tuple[str, ...]] = ()  # config keys (dotted) its output depends on
    collective: ClassVar[bool] = False  # every rank of a data-parallel run joins it (rank 0 alone otherwise)

    def enabled(self, config: PipelineConfig) -> str | None:
        """``None`` when the stage runs for this config, else the reason it is skipped."""
        return None

    def config_keys(self, config: PipelineConfig) -> tuple[str, ...]:
        """The config keys this stage's output depends on, for this config (:attr:`reads` unless overridden)."""
        return self.reads

    def outside_inputs(self, config: PipelineConfig) -> str:
        """A digest of what the stage reads from outside the run folder (the teacher's source model)."""
        return ""

    def fingerprint(self, config: PipelineConfig, stages: dict[str, Any]) -> str:
        """sha256 of the config values it reads, of its input stages' artifacts (``stages``: the manifest's) and
        of what it reads from outside the run."""
        data = config.to_dict()
        picked = {
            "config": {key: config_value(data, key) for key in self.config_keys(config)},
            "inputs": {name: output_digest(stages.get(name)) for name in self.requires},
            "outside": self.outside_inputs(config),
        }
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Do the work, writing into ``ctx.out``; return a JSON-ready summary for the manifest."""
        raise NotImplementedError
