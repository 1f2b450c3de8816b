"""Runs the stages in order against one run folder, resuming what verifies and recording everything."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from calib.errors import ConfigError, PipelineError, StageUnavailable, ThresholdFailed
from calib.parallel import SINGLE, Parallel
from pipeline import __version__
from pipeline.config import PipelineConfig
from pipeline.launch import restore_threads
from pipeline.runfolder import RunFolder, now, package_versions
from pipeline.stages import STAGES
from pipeline.stages.base import StageContext


def config_sha256(config: PipelineConfig) -> str:
    """sha256 of the canonical JSON form of the config."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def _is_reusable(run: RunFolder, entry: dict[str, Any] | None, fingerprint: str) -> bool:
    return bool(
        entry
        and entry.get("status") == "done"
        and entry.get("fingerprint") == fingerprint
        and not run.damaged(entry.get("artifacts", {}))
    )


def run_pipeline(
    config: PipelineConfig,
    out: Path,
    resume: bool = False,
    force: bool = False,
    show_progress: bool = True,
    parallel: Parallel = SINGLE,
) -> dict[str, Any]:
    """Run every enabled stage; returns the final manifest. In a data-parallel run this is rank 0's side
    (the other ranks run :func:`follow_stages`): it alone writes, and it calls the others into each
    collective stage.

    ``--resume`` and ``--force`` act only on a folder this tool wrote (its manifest says so). ``--force``
    runs into a sibling folder and replaces the old run only once the new one has run; a failure leaves the
    old run as it was. Raises :class:`StageUnavailable` at the end when a requested stage (TensorRT build)
    could not run on this machine, after every stage that could run has run.
    """
    run = RunFolder(out)
    if run.exists() and not (resume or force):
        raise PipelineError(f"{out}: run folder already exists; pass --resume to continue it or --force to replace it")
    if run.exists() and not run.is_run_folder():
        raise ConfigError(
            f"{out}: not a zsaq-pipeline run folder (no manifest of this tool); refusing to write into it"
        )
    if not (force and not resume and run.exists()):
        with run.locked():
            return _run_stages(config, run, resume, show_progress, parallel)
    new = RunFolder(out.parent / f".{out.name}.new", shown=out)
    with run.locked():  # nobody else writes to the old run while it is being replaced
        shutil.rmtree(new.root, ignore_errors=True)
        try:
            with new.locked():
                manifest = _run_stages(config, new, False, show_progress, parallel)
        except (StageUnavailable, ThresholdFailed):  # the new run is complete: replace the old one, then say why
            _replace(run, new)
            raise
        except BaseException:
            shutil.rmtree(new.root, ignore_errors=True)
            raise
        _replace(run, new)
    return manifest


def _replace(run: RunFolder, new: RunFolder) -> None:
    """Swap the finished ``new`` run into the place of ``run`` and delete the old one."""
    old = run.root.parent / f".{run.root.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(run.root, old)
    os.replace(new.root, run.root)
    shutil.rmtree(old)


def _last_collective(config: PipelineConfig) -> str | None:
    """The last enabled stage the other ranks join: after it, they are released."""
    names = [s.name for s in STAGES if s.collective and s.enabled(config) is None]
    return names[-1] if names else None


def _release(parallel: Parallel) -> None:
    """Let the other ranks go; rank 0 continues alone with every core."""
    parallel.broadcast(None)
    restore_threads()


def _run_stages(
    config: PipelineConfig, run: RunFolder, resume: bool, show_progress: bool, parallel: Parallel
) -> dict[str, Any]:
    manifest = run.load_manifest() if resume else {}
    manifest.update(
        {
            "zsaq_pipeline": __version__,
            "updated": now(),
            "config": config.to_dict(),
            "config_sha256": config_sha256(config),
            "packages": package_versions(),
        }
    )
    manifest.setdefault("created", now())
    stages: dict[str, Any] = manifest.setdefault("stages", {})
    run.save_manifest(manifest)

    unavailable: list[StageUnavailable] = []
    last_collective = _last_collective(config) if parallel.world_size > 1 else None
    for stage in STAGES:
        skip_reason = stage.enabled(config)
        if skip_reason is not None:
            run.remove_stage(stage.name)  # from an earlier run that asked for it: nothing stale stays
            stages[stage.name] = {"status": "skipped", "reason": skip_reason}
            run.save_manifest(manifest)
            continue
        fingerprint = stage.fingerprint(config, stages)  # its config keys and its input stages' artifacts
        if resume and _is_reusable(run, stages.get(stage.name), fingerprint):
            if show_progress:
                print(f"[{stage.name}] artifacts verified, skipping", flush=True)
            if stage.name == last_collective:
                _release(parallel)  # nothing left for the other ranks to join
                last_collective = None
            continue
        stages[stage.name] = {"status": "running", "started": now(), "pid": os.getpid()}
        run.save_manifest(manifest)
        if show_progress:
            print(f"[{stage.name}] running", flush=True)
        staging = run.staging_dir(stage.name)
        started = time.perf_counter()
        if stage.collective and last_collective is not None:
            parallel.broadcast({"stage": stage.name, "fingerprint": fingerprint, "root": str(run.root)})
        try:
            summary = stage.run(StageContext(config, run, staging, fingerprint, show_progress, parallel))
        except StageUnavailable as exc:
            stages[stage.name] = {"status": "unavailable", "reason": str(exc)}
            run.save_manifest(manifest)
            unavailable.append(exc)
            continue
        except ThresholdFailed as exc:  # the report is worth keeping: commit it, then fail
            stages[stage.name] = {
                "status": "failed",
                "error": str(exc),
                "artifacts": run.commit_stage(stage.name, staging),
            }
            run.save_manifest(manifest)
            raise
        except BaseException as exc:
            stages[stage.name] = {"status": "failed", "error": str(exc) or type(exc).__name__}
            run.save_manifest(manifest)
            raise
        artifacts = run.commit_stage(stage.name, staging)
        stages[stage.name] = {
            "status": "done",
            "seconds": round(time.perf_counter() - started, 3),
            "fingerprint": fingerprint,
            "artifacts": artifacts,
            "summary": summary,
        }
        manifest["updated"] = now()
        run.save_manifest(manifest)
        if stage.name == last_collective:
            _release(parallel)  # the rest is rank 0's
            last_collective = None
    if unavailable:
        raise unavailable[0]
    return manifest


def follow_stages(config: PipelineConfig, parallel: Parallel) -> None:
    """The side of ranks other than 0 in a data-parallel run: join each collective stage rank 0 announces,
    in a scratch folder that is never committed, until rank 0 releases them. They write nothing to the run."""
    by_name = {stage.name: stage for stage in STAGES}
    while (order := parallel.broadcast(None)) is not None:
        with tempfile.TemporaryDirectory(prefix=f"zsaq-rank{parallel.rank}-") as scratch:
            context = StageContext(config, RunFolder(Path(order["root"])), Path(scratch), order["fingerprint"],
                                   show_progress=False, parallel=parallel)  # fmt: skip
            by_name[order["stage"]].run(context)
