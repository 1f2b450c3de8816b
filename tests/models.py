"""Tiny in-process models shared by the unit tests."""

from __future__ import annotations

from calib.models import TaskModel, load_backbone
from pipeline.config import ModelSource, RandomModel, TaskConfig

KIND_BY_FAMILY = {"bert": "classification", "gpt2": "causal-lm", "llama": "causal-lm"}


def tiny_teacher(family: str = "bert", kind: str | None = None, hidden: int = 64, seed: int = 0) -> TaskModel:
    """A random-init task model of the family (classification for BERT, causal LM otherwise)."""
    task = TaskConfig(kind=kind or KIND_BY_FAMILY[family])
    spec = RandomModel(family=family, hidden=hidden, intermediate=2 * hidden, seed=seed)
    return TaskModel(load_backbone(ModelSource(random=spec), task), task.kind).eval()
