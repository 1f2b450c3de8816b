"""What a stage is: a name, the stages it reads, the config sections it depends on, and a run method."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config import PipelineConfig
from pipeline.runfolder import RunFolder


@dataclass
class StageContext:
    """Everything a running stage may touch: the config, earlier stages' folders, its own staging folder."""

    config: PipelineConfig
    run: RunFolder
    out: Path
    show_progress: bool = True

    def input_dir(self, stage: str) -> Path:
        """The committed folder of an earlier stage."""
        return self.run.stage_dir(stage)

    def log(self, message: str) -> None:
        """A progress line for the person watching."""
        if self.show_progress:
            print(message, flush=True)


class Stage:
    """Base class: subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    config_sections: ClassVar[tuple[str, ...]] = ()

    def enabled(self, config: PipelineConfig) -> str | None:
        """``None`` when the stage runs for this config, else the reason it is skipped."""
        return None

    def sections(self, config: PipelineConfig) -> tuple[str, ...]:
        """The config sections this stage's output depends on (for this config)."""
        return self.config_sections

    def fingerprint(self, config: PipelineConfig) -> str:
        """sha256 of the config sections this stage depends on: a changed one re-runs it on --resume."""
        data = config.to_dict()
        picked = {key: data[key] for key in self.sections(config)}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Do the work, writing into ``ctx.out``; return a JSON-ready summary for the manifest."""
        raise NotImplementedError
