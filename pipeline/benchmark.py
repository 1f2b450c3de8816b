"""``zsaq-pipeline bench --table SPEC``: the comparison table against the field, from real weights.

The spec (YAML) names the tasks (a pipeline config each, plus the training file the real-data rows may
read), the seeds and the model whose CPU formats are timed. Every (task, row, seed) is one cell, run in
its own process and stored as JSON under ``OUT/cells``; the table is rendered from whatever cells exist,
so an interrupted benchmark continues where it stopped and a missing figure shows as pending, never as
a number typed in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from pipeline.benchmark_rows import ROWS, Row, task_family
from pipeline.config import load_config
from pipeline.errors import ConfigError

CELLS_DIR = "cells"
LATENCY_CELL = "latency.json"


@dataclass(frozen=True)
class BenchTask:
    """One column of metrics: a pipeline config and its evaluation data."""

    name: str
    column: str
    config: Path
    seeds: tuple[int, ...]
    real_data: Path | None = None


@dataclass(frozen=True)
class BenchSpec:
    """What the table covers."""

    path: Path
    tasks: tuple[BenchTask, ...]
    latency_config: Path
    latency_repeats: int


def _expect(condition: bool, path: Path, key: str, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{path}: {key}: expected {expected}")


def load_spec(path: Path) -> BenchSpec:
    """Read and check the spec; relative paths are relative to the spec file."""
    if not path.is_file():
        raise ConfigError(f"bench --table: no spec file at {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    _expect(isinstance(raw, dict), path, "top level", "a mapping with tasks, seeds and latency")
    unknown = set(raw) - {"tasks", "seeds", "latency"}
    _expect(not unknown, path, ", ".join(sorted(unknown)), "one of tasks, seeds, latency (unknown key)")
    seeds = raw.get("seeds", [0, 1, 2])
    _expect(
        isinstance(seeds, list) and all(isinstance(s, int) for s in seeds) and seeds, path, "seeds", "a list of ints"
    )
    tasks_raw = raw.get("tasks")
    _expect(isinstance(tasks_raw, dict) and tasks_raw, path, "tasks", "a mapping of task name to its settings")
    tasks = []
    for name, entry in tasks_raw.items():
        _expect(isinstance(entry, dict) and "config" in entry, path, f"tasks.{name}", "a mapping with config")
        extra = set(entry) - {"config", "column", "seeds", "real_data"}
        _expect(not extra, path, f"tasks.{name}.{','.join(sorted(extra))}", "one of config, column, seeds, real_data")
        config = (path.parent / entry["config"]).resolve()
        _expect(config.is_file(), path, f"tasks.{name}.config", f"an existing config file (no file at {config})")
        task_seeds = entry.get("seeds", seeds)
        _expect(isinstance(task_seeds, list) and task_seeds, path, f"tasks.{name}.seeds", "a list of ints")
        real = entry.get("real_data")
        tasks.append(
            BenchTask(
                name, str(entry.get("column", name)), config, tuple(task_seeds),
                None if real is None else (path.parent / real).resolve(),
            )
        )  # fmt: skip
    latency = raw.get("latency", {})
    _expect(isinstance(latency, dict) and "config" in latency, path, "latency", "a mapping with config and repeats")
    latency_config = (path.parent / latency["config"]).resolve()
    _expect(latency_config.is_file(), path, "latency.config", f"an existing config file (no file at {latency_config})")
    repeats = latency.get("repeats", 20)
    _expect(isinstance(repeats, int) and repeats >= 4, path, "latency.repeats", "an int >= 4")
    return BenchSpec(path, tuple(tasks), latency_config, repeats)


@dataclass(frozen=True)
class Cell:
    """One (task, row, seed) of the table and the file its result lives in."""

    task: BenchTask
    row: Row
    seed: int

    def path(self, out: Path) -> Path:
        """``OUT/cells/<task>__<row>__s<seed>.json``."""
        return out / CELLS_DIR / f"{self.task.name}__{self.row.key}__s{self.seed}.json"


def planned_cells(spec: BenchSpec, rows: tuple[str, ...] = (), tasks: tuple[str, ...] = ()) -> list[Cell]:
    """Every cell the spec asks for that applies (optionally only the named rows / tasks)."""
    known_rows, known_tasks = {r.key for r in ROWS}, {t.name for t in spec.tasks}
    for key in rows:
        if key not in known_rows:
            raise ConfigError(f"bench --rows: unknown row '{key}' (known: {', '.join(r.key for r in ROWS)})")
    for name in tasks:
        if name not in known_tasks:
            raise ConfigError(f"bench --tasks: unknown task '{name}' (the spec has: {', '.join(sorted(known_tasks))})")
    families = {task.name: task_family(load_config(task.config)) for task in spec.tasks}
    cells = []
    for row in ROWS:
        if rows and row.key not in rows:
            continue
        for task in spec.tasks:
            if tasks and task.name not in tasks:
                continue
            if row.reason_not_run(families[task.name]) is not None:
                continue
            if row.uses_data and task.real_data is None:
                continue  # the table says why (no real_data in the spec)
            for seed in task.seeds if row.seeded else task.seeds[:1]:
                cells.append(Cell(task, row, seed))
    return cells


def _cell_command(cell: Cell, out_file: Path) -> list[str]:
    command = [sys.executable, "-m", "pipeline.benchmark_cell", "--config", str(cell.task.config)]
    command += ["--row", cell.row.key, "--seed", str(cell.seed), "--out", str(out_file)]
    if cell.row.uses_data:
        command += ["--real-data", str(cell.task.real_data)]
    return command


def _run(command: list[str], failure_file: Path) -> bool:
    """Run one cell process; on failure keep its last error line next to the cells."""
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode == 0:
        failure_file.unlink(missing_ok=True)
        return True
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    failure_file.parent.mkdir(parents=True, exist_ok=True)
    failure_file.write_text((lines[-1] if lines else f"exit {result.returncode}") + "\n", encoding="utf-8")
    return False


def run_missing(spec: BenchSpec, out: Path, cells: list[Cell], latency: bool) -> list[str]:
    """Run every cell whose file does not exist yet (and the latency measurement); returns failures."""
    failures = []
    todo = [c for c in cells if not c.path(out).is_file()]
    latency_file = out / CELLS_DIR / LATENCY_CELL
    with tqdm(total=len(todo) + (latency and not latency_file.is_file()), desc="bench cells", unit="cell") as bar:
        if latency and not latency_file.is_file():
            bar.set_postfix_str("latency")
            command = [sys.executable, "-m", "pipeline.benchmark_cell", "--config", str(spec.latency_config)]
            command += ["--latency", str(spec.latency_repeats), "--out", str(latency_file)]
            if not _run(command, latency_file.with_suffix(".error.txt")):
                failures.append("latency")
            bar.update()
        for cell in todo:
            bar.set_postfix_str(f"{cell.task.name} {cell.row.key} seed {cell.seed}")
            path = cell.path(out)
            if not _run(_cell_command(cell, path), path.with_suffix(".error.txt")):
                failures.append(
                    f"{cell.task.name} {cell.row.key} seed {cell.seed}: "
                    + path.with_suffix(".error.txt").read_text().strip()
                )
            bar.update()
    return failures


def read_cells(spec: BenchSpec, out: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``{(task, row): [cell results over seeds]}`` for every cell file present."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for task in spec.tasks:
        for row in ROWS:
            for seed in task.seeds:
                path = Cell(task, row, seed).path(out)
                if path.is_file():
                    results.setdefault((task.name, row.key), []).append(read_cell(path))
    return results


def read_cell(path: Path) -> dict[str, Any]:
    """One cell's result; a damaged file is a one-line error naming it (delete it and the cell runs again)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        result = None
    if not isinstance(result, dict) or not {"metric", "minutes", "peak_gib"} <= set(result):
        raise ConfigError(
            f"{path}: not a benchmark cell (expected JSON with metric, minutes, peak_gib); delete it to re-run"
        )
    return result
