"""Shared fixtures: tiny configs written to disk and a CLI runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main

TINY: dict[str, Any] = {
    "model": {"random": {"family": "bert"}},
    "task": {"kind": "classification"},
    "calib": {"method": "random-tokens", "samples": 32, "seq_len": 32, "batch_size": 16},
    "validate": {"shapes": [[1, 32], [4, 32]], "repeats": 2, "warmup": 1, "samples": 16},
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (override wins)."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a YAML config (TINY merged with overrides, or raw text) and return its path."""

    def write(override: dict[str, Any] | None = None, text: str | None = None, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text if text is not None else yaml.safe_dump(merge(TINY, override or {})), encoding="utf-8")
        return path

    return write


@pytest.fixture
def cli():
    """Invoke the CLI in-process; returns click's Result (stdout and stderr kept apart)."""

    def invoke(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args])

    return invoke
