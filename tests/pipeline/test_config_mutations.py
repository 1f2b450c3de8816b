"""Hundreds of seeded random bad configs, thrown at ``zsaq-pipeline run``: each one is exit 2, one line, no
traceback, and no folder written. The mutations are drawn from the config's own types, so a new key is
covered the day it is added."""

from __future__ import annotations

import dataclasses
import random
import types
import typing
from typing import Annotated, Any, Literal

import pytest
import yaml

from calib.config import Range, RelativePath
from calib.errors import ConfigError
from pipeline.config import PipelineConfig, merge, parse_config
from tests.models import TINY

CASES = 320
WRONG_TYPE = {
    int: ["zz", 1.5, True, [1], {"a": 1}],
    float: ["zz", True, float("nan"), float("inf"), [0.5]],
    bool: ["maybe", 1, [True]],
    str: [["x"], 3, {"a": 1}, ""],
}


def leaves(tp: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every (key path, type) of the config schema, through optional sections."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(arg for arg in typing.get_args(tp) if arg is not type(None))
    if not dataclasses.is_dataclass(tp):
        return [(path, tp)]
    hints = typing.get_type_hints(tp, include_extras=True)
    found = [(path, tp)] if path else []
    for field in dataclasses.fields(tp):
        found += leaves(hints[field.name], (*path, field.name))
    return found


def bad_values(tp: Any) -> list[Any]:
    """Values the parser must refuse for a field of type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return ["zz", 5, ["x"]]
    if origin is Annotated and args[1] is RelativePath:
        return WRONG_TYPE[str]
    if origin is Annotated and isinstance(args[1], Range):
        bounds = args[1]
        out_of_range = [bounds.low if bounds.low_open else bounds.low - 1] if bounds.low is not None else []
        return WRONG_TYPE[args[0]] + out_of_range + ([bounds.high + 1] if bounds.high is not None else [])
    if origin in (Literal, Annotated):
        return ["bogus-choice", 7, ["x"]]
    if origin is tuple:
        return ["zz", 5, {"a": 1}]
    return WRONG_TYPE[tp]


def mutated(rng: random.Random) -> tuple[dict[str, Any], str]:
    """TINY with one bad value (or one unknown key) at a random place; returns it and what was done."""
    path, tp = rng.choice(leaves(PipelineConfig))
    if dataclasses.is_dataclass(tp) and rng.random() < 0.3:
        path, value = (*path, "no_such_key"), 1
    else:
        value = rng.choice(bad_values(tp))
    patch: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        patch = {key: patch}
    return merge(TINY, patch), f"{'.'.join(path)} = {value!r}"


@pytest.mark.parametrize("chunk", range(4))
def test_random_bad_configs_are_one_line_exit_2_and_write_nothing(cli, tmp_path, chunk):
    rng = random.Random(chunk)
    for case in range(CASES // 4):
        raw, what = mutated(rng)
        config, out = tmp_path / f"bad{case}.yaml", tmp_path / f"run{case}"
        config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        result = cli("run", config, "--out", out)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, (what, result.output)
        assert not out.exists(), what


def test_the_serve_section_is_among_the_mutated_keys_and_every_bad_value_is_one_line():
    """The serve section (issue 20) is drawn like every other; each of its bad values fails the parse in one line
    naming the key."""
    keys = {path: tp for path, tp in leaves(PipelineConfig) if path[:1] == ("serve",)}
    assert set(keys) >= {
        ("serve", "instances"),
        ("serve", "dynamic_batching"),
        ("serve", "dynamic_batching", "preferred_batch_sizes"),
        ("serve", "dynamic_batching", "max_queue_delay_us"),
    }
    for path, tp in keys.items():
        for value in bad_values(tp):
            patch: dict[str, Any] = {path[-1]: value}
            for key in reversed(path[:-1]):
                patch = {key: patch}
            with pytest.raises(ConfigError) as info:
                parse_config(merge(TINY, patch))
            message = str(info.value)
            assert ".".join(path) in message and "\n" not in message, (path, value, message)
