"""A run folder's summary for ``zsaq-pipeline inspect``: each stage as recorded, checked against the folder
(damaged artifacts), the config (stale stages) and the process table (an interrupted run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calib.errors import PipelineError
from pipeline.config import PipelineConfig, build
from pipeline.runfolder import RunFolder, process_alive
from pipeline.stages import STAGES
from pipeline.stages.base import Stage


def checked_status(
    run: RunFolder, stage: Stage, entry: dict[str, Any], config: PipelineConfig, recorded: dict[str, Any]
) -> str:
    """The recorded status, unless the folder or the config says otherwise: ``damaged`` (an artifact is missing
    or changed), ``stale`` (its config or inputs changed since it ran), ``interrupted`` (its process is gone)."""
    status = entry.get("status", "pending")
    if status == "running" and not (process_alive(entry.get("pid", -1)) and run.holder() is not None):
        return "interrupted (its process is gone; continue with --resume)"
    if status != "done":
        return status
    damaged = run.damaged(entry.get("artifacts", {}))
    if damaged:
        return f"damaged ({len(damaged)} artifact(s) missing or changed: {damaged[0]}; --resume re-runs it)"
    if entry.get("fingerprint") != stage.fingerprint(config, recorded):
        return "stale (its config, inputs or source model changed since it ran; --resume re-runs it)"
    return status


def summarize(run_dir: Path) -> dict[str, Any]:
    """Stages (checked status, seconds, artifacts), versions and the headline metrics of a run."""
    run = RunFolder(run_dir)
    manifest = run.load_manifest()
    if "zsaq_pipeline" not in manifest:
        raise PipelineError(f"{run_dir}: no manifest.json of zsaq-pipeline here (not a run folder)")
    config = build(PipelineConfig, manifest.get("config"), str(run.manifest_path))
    stages = []
    recorded = manifest["stages"]
    for stage in STAGES:
        entry = recorded.get(stage.name, {"status": "pending"})
        stages.append(
            {
                "name": stage.name,
                "status": checked_status(run, stage, entry, config, recorded),
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
