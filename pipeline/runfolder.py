"""The run folder: one sub-folder per stage, written as ``.tmp-<stage>/`` and renamed when the stage finishes
(a killed stage leaves nothing under a final name), and ``manifest.json``, replaced atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from calib.errors import PipelineError
from pipeline.layout import LOCK, MANIFEST

TRACKED_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "tensorrt")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers (absent ones left out)."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def now() -> str:
    """UTC timestamp for the manifest."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """Reads and updates one run folder and its manifest."""

    def __init__(self, root: Path, shown: Path | None = None) -> None:
        self.root = Path(root)
        self.shown = Path(shown or root)  # where the user finds it (a --force run is written beside it first)

    @property
    def manifest_path(self) -> Path:
        """Where the manifest lives."""
        return self.root / MANIFEST

    def exists(self) -> bool:
        """Whether this folder already holds a run (or anything at all)."""
        return self.root.exists() and any(self.root.iterdir())

    def is_run_folder(self) -> bool:
        """Whether zsaq-pipeline wrote this folder: its manifest says so (a damaged manifest is an error)."""
        return "zsaq_pipeline" in self.load_manifest()

    def load_manifest(self) -> dict[str, Any]:
        """The manifest as a dict (empty if there is none yet); a damaged one is a one-line error naming it."""
        if not self.manifest_path.is_file():
            return {}
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            manifest = None
        stages = manifest.get("stages", {}) if isinstance(manifest, dict) else None
        if not isinstance(stages, dict) or not all(isinstance(entry, dict) for entry in stages.values()):
            raise PipelineError(
                f"{self.manifest_path}: damaged manifest (expected a JSON object whose stages are objects); "
                "run again with --force to replace the run"
            )
        return manifest

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest atomically."""
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")

    @property
    def lock_path(self) -> Path:
        """The lock file of a run in progress (it holds the running process's id)."""
        return self.root / LOCK

    def holder(self) -> int | None:
        """The id of the live process that holds the lock, if one does."""
        try:
            pid = int(self.lock_path.read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            return None
        return pid if process_alive(pid) else None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run folder for this process: a second run into it is refused while this one lives; a lock
        left by a killed process is taken over."""
        self.root.mkdir(parents=True, exist_ok=True)
        holder = self.holder()
        if holder is not None and holder != os.getpid():
            raise PipelineError(f"{self.root}: in use by process {holder} (its {LOCK}); wait for it or stop it")
        atomic_write_text(self.lock_path, f"{os.getpid()}\n")
        try:
            yield
        finally:
            self.lock_path.unlink(missing_ok=True)

    def stage_dir(self, stage: str) -> Path:
        """The final folder of a stage's artifacts."""
        return self.root / stage

    def staging_dir(self, stage: str) -> Path:
        """A fresh temp folder for a stage to write into."""
        tmp = self.root / f".tmp-{stage}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_stage(self, stage: str, staging: Path) -> dict[str, str]:
        """Rename the staging folder into place; returns {relative path: sha256} of every file in it."""
        self.remove_stage(stage)
        os.replace(staging, self.stage_dir(stage))
        return self.artifact_hashes(self.stage_dir(stage))

    def remove_stage(self, stage: str) -> None:
        """Remove a stage's folder (a stage no longer asked for leaves nothing stale behind)."""
        shutil.rmtree(self.stage_dir(stage), ignore_errors=True)

    def artifact_hashes(self, folder: Path) -> dict[str, str]:
        """{path relative to the run folder: sha256} for every file below ``folder``."""
        return {
            str(path.relative_to(self.root)): sha256_file(path) for path in sorted(folder.rglob("*")) if path.is_file()
        }

    def damaged(self, artifacts: dict[str, str]) -> list[str]:
        """The recorded artifacts that are missing or whose sha256 changed."""
        return [
            rel
            for rel, digest in artifacts.items()
            if not (self.root / rel).is_file() or sha256_file(self.root / rel) != digest
        ]
