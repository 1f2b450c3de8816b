"""The run folder: one sub-folder per stage, written as ``.tmp-<stage>/`` and renamed when the stage finishes
(a killed stage leaves nothing under a final name), and ``manifest.json``, replaced atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.layout import MANIFEST

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


class RunFolder:
    """Reads and updates one run folder and its manifest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        """Where the manifest lives."""
        return self.root / MANIFEST

    def exists(self) -> bool:
        """Whether this folder already holds a run (or anything at all)."""
        return self.root.exists() and any(self.root.iterdir())

    def load_manifest(self) -> dict[str, Any]:
        """The manifest as a dict (empty if there is none yet)."""
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace the manifest atomically."""
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")

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
        final = self.stage_dir(stage)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        return self.artifact_hashes(final)

    def artifact_hashes(self, folder: Path) -> dict[str, str]:
        """{path relative to the run folder: sha256} for every file below ``folder``."""
        return {
            str(path.relative_to(self.root)): sha256_file(path) for path in sorted(folder.rglob("*")) if path.is_file()
        }

    def verify(self, artifacts: dict[str, str]) -> bool:
        """True when every listed artifact exists with the recorded sha256."""
        for rel, digest in artifacts.items():
            path = self.root / rel
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def clear(self) -> None:
        """Remove everything in the folder (``--force``)."""
        if self.root.exists():
            shutil.rmtree(self.root)
