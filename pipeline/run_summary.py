"""A run folder's summary for ``zsaq-pipeline inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calib.errors import PipelineError
from pipeline.runfolder import RunFolder
from pipeline.stages import STAGES


def summarize(run_dir: Path) -> dict[str, Any]:
    """Stages (status, seconds, artifacts), versions and the headline metrics of a run."""
    run = RunFolder(run_dir)
    manifest = run.load_manifest()
    if not manifest:
        raise PipelineError(f"{run_dir}: no manifest.json here (not a run folder)")
    stages = []
    recorded = manifest.get("stages", {})
    for stage in STAGES:
        entry = recorded.get(stage.name, {"status": "pending"})
        stages.append(
            {
                "name": stage.name,
                "status": entry.get("status"),
                "seconds": entry.get("seconds"),
                "artifacts": sorted(entry.get("artifacts", {})),
                "reason": entry.get("reason"),
                "error": entry.get("error"),
            }
        )
    headline: dict[str, Any] = {}
    quantize = recorded.get("quantize", {}).get("summary", {})
    if quantize:
        headline["scheme"] = quantize.get("scheme")
    for name, values in recorded.get("validate", {}).get("summary", {}).items():
        headline[name] = values
    return {
        "run_dir": str(run_dir),
        "version": manifest.get("zsaq_pipeline"),
        "config_sha256": manifest.get("config_sha256", ""),
        "packages": manifest.get("packages", {}),
        "stages": stages,
        "headline": headline,
    }
