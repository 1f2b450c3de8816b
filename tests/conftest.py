"""Shared fixtures: tiny configs written to disk, a CLI runner, and a finished tiny text run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import merge
from tests.models import TINY, make_text_run


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


@pytest.fixture(scope="session")
def text_run(tmp_path_factory) -> Path:
    """A finished ``--export triton`` run of a tiny BERT classifier with a real tokenizer (made once)."""
    return make_text_run(tmp_path_factory.getbasetemp())
