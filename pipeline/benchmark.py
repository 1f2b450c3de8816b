"""``zsaq-pipeline bench --table SPEC``: comparison tables from real weights, one process per cell, rendered
from whatever cell files exist (the spec and why: docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from tqdm import tqdm

from calib.config import FilePath, Range
from calib.errors import ConfigError
from pipeline.benchmark_rows import Row, load_rows, task_family
from pipeline.config import PipelineConfig, build, merge, parse_config, read_yaml
from pipeline.runfolder import atomic_write_text

CELLS_DIR = "cells"
LATENCY_ID = "latency"  # the latency measurement's cell id (``bench --list-cells`` / ``--cell``)
LATENCY_CELL = f"{LATENCY_ID}.json"


@dataclass(frozen=True)
class TaskEntry:
    """A task as the spec file names it (paths relative to the spec)."""

    config: FilePath
    column: str | None = None
    seeds: tuple[int, ...] | None = None
    real_data: FilePath | None = None


@dataclass(frozen=True)
class LatencyEntry:
    """The model whose CPU formats are timed, and how many timed calls per format and shape."""

    config: FilePath
    repeats: Annotated[int, Range("4 or more (one per measuring block)", 4)] = 20


@dataclass(frozen=True)
class SpecFile:
    """The spec file as written: ``rows`` are catalogue keys (default: all), ``config`` a patch of every task's
    config, ``claims`` pairs of rows to compare, ``fidelity`` also records agreement with the FP model,
    ``exported`` also scores each row's CPU ONNX (a student's CPU flavour, the FP32 graph; a peer's row is ONNX),
    ``average`` names a column of each row's mean over the tasks (seed by seed, as GLUE's average score)."""

    tasks: dict[str, TaskEntry]
    catalogue: FilePath | None = None  # default: rows.yaml beside the spec
    rows: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    config: dict[str, Any] = field(default_factory=dict)
    fidelity: bool = False
    exported: bool = False
    average: str | None = None
    claims: tuple[tuple[str, str], ...] = ()
    latency: LatencyEntry | None = None


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
    """What a table covers, paths resolved and rows looked up."""

    path: Path
    tasks: tuple[BenchTask, ...]
    catalogue: Path
    rows: tuple[Row, ...]
    config: dict[str, Any] = field(default_factory=dict)
    fidelity: bool = False
    exported: bool = False
    average: str | None = None
    claims: tuple[tuple[str, str], ...] = ()
    latency_config: Path | None = None
    latency_repeats: int = 20


def load_spec(path: Path) -> BenchSpec:
    """Read and check the spec; relative paths are relative to the spec file."""
    raw = build(SpecFile, read_yaml(path, "bench spec"), str(path), base_dir=path.parent)

    def existing(name: str, key: str) -> Path:
        if not Path(name).is_file():
            raise ConfigError(f"{path}: {key}: expected an existing file (no file at {name})")
        return Path(name)

    if not raw.tasks or not raw.seeds or any(task.seeds == () for task in raw.tasks.values()):
        raise ConfigError(f"{path}: tasks: expected a mapping of task name to its settings, each with seeds")
    tasks = tuple(
        BenchTask(
            name, entry.column or name, existing(entry.config, f"tasks.{name}.config"), entry.seeds or raw.seeds,
            None if entry.real_data is None else Path(entry.real_data),
        )
        for name, entry in raw.tasks.items()
    )  # fmt: skip
    catalogue = existing(raw.catalogue or str(path.parent / "rows.yaml"), "catalogue")
    rows = load_rows(catalogue)
    keys = raw.rows or tuple(rows)
    for key in (*keys, *(k for pair in raw.claims for k in pair)):
        if key not in keys or key not in rows:
            raise ConfigError(f"{path}: rows: unknown row '{key}' (the catalogue has: {', '.join(rows)})")
    latency = raw.latency or LatencyEntry("")
    timed = existing(latency.config, "latency.config") if raw.latency else None
    return BenchSpec(
        path, tasks, catalogue, tuple(rows[k] for k in keys), raw.config, raw.fidelity, raw.exported, raw.average,
        raw.claims, timed, latency.repeats,
    )  # fmt: skip


def task_config(spec: BenchSpec, task: BenchTask, patch: dict[str, Any] | None = None) -> PipelineConfig:
    """The task's pipeline config with the spec's patch, then ``patch`` (a row's), merged in."""
    raw = read_yaml(task.config)
    return parse_config(merge(merge(raw, spec.config), patch or {}), str(task.config), task.config.parent)


@dataclass(frozen=True)
class Cell:
    """One (task, row, seed) of the table and the file its result lives in."""

    task: BenchTask
    row: Row
    seed: int

    @property
    def id(self) -> str:
        """``<task>__<row>__s<seed>``: the cell's file stem."""
        return f"{self.task.name}__{self.row.key}__s{self.seed}"

    def path(self, out: Path) -> Path:
        """``OUT/cells/<id>.json``."""
        return out / CELLS_DIR / f"{self.id}.json"


def planned_cells(spec: BenchSpec, rows: tuple[str, ...] = (), tasks: tuple[str, ...] = ()) -> list[Cell]:
    """Every cell the spec asks for that applies (optionally only the named rows / tasks)."""
    known_rows, known_tasks = {r.key for r in spec.rows}, {t.name for t in spec.tasks}
    for key in rows:
        if key not in known_rows:
            raise ConfigError(f"bench --rows: unknown row '{key}' (known: {', '.join(r.key for r in spec.rows)})")
    for name in tasks:
        if name not in known_tasks:
            raise ConfigError(f"bench --tasks: unknown task '{name}' (the spec has: {', '.join(sorted(known_tasks))})")
    families = {task.name: task_family(task_config(spec, task)) for task in spec.tasks}
    cells = []
    for row in spec.rows:
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


def cell_ids(spec: BenchSpec, cells: list[Cell], latency: bool) -> list[str]:
    """What ``bench --list-cells`` prints: the latency measurement first (if the spec times one and ``latency``),
    then every cell's id."""
    timed = [LATENCY_ID] if latency and spec.latency_config is not None else []
    return timed + [cell.id for cell in cells]


def select_cells(
    spec: BenchSpec, cells: list[Cell], latency: bool, ids: tuple[str, ...], listing: str
) -> tuple[list[Cell], bool]:
    """The cells ``bench --cell`` names (among ``cells``) and whether the latency measurement is one of them;
    an id :func:`cell_ids` does not list is a one-line error naming ``listing``, the command that lists them."""
    known = {cell.id: cell for cell in cells}
    listed = cell_ids(spec, cells, latency)
    for cell_id in ids:
        if cell_id not in listed:
            raise ConfigError(f"bench --cell: unknown cell '{cell_id}' (list the {len(listed)} cells: {listing})")
    return [known[i] for i in dict.fromkeys(ids) if i in known], LATENCY_ID in ids


def _cell_command(spec: BenchSpec, cell: Cell, out_file: Path) -> list[str]:
    command = [sys.executable, "-m", "pipeline.benchmark_cell", "--spec", str(spec.path), "--task", cell.task.name]
    return command + ["--row", cell.row.key, "--seed", str(cell.seed), "--out", str(out_file)]


def _run(command: list[str], failure_file: Path) -> bool:
    """Run one cell process; on failure keep its last error line next to the cells."""
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode == 0:
        failure_file.unlink(missing_ok=True)
        return True
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    atomic_write_text(failure_file, (lines[-1] if lines else f"exit {result.returncode}") + "\n")
    return False


def run_missing(spec: BenchSpec, out: Path, cells: list[Cell], latency: bool, progress: bool = True) -> list[str]:
    """Run every cell whose file does not exist yet (and the latency measurement); returns failures. Each cell
    process writes its file through a temporary name, so workers sharing ``out`` never see a partial file."""
    failures = []
    todo = [c for c in cells if not c.path(out).is_file()]
    latency_file = out / CELLS_DIR / LATENCY_CELL
    measure = latency and spec.latency_config is not None and not latency_file.is_file()
    with tqdm(total=len(todo) + measure, desc="bench cells", unit="cell", disable=not progress) as bar:
        if measure:
            bar.set_postfix_str(LATENCY_ID)
            command = [sys.executable, "-m", "pipeline.benchmark_cell", "--spec", str(spec.path), "--latency"]
            if not _run([*command, "--out", str(latency_file)], latency_file.with_suffix(".error.txt")):
                failures.append(f"{LATENCY_ID}: " + latency_file.with_suffix(".error.txt").read_text().strip())
            bar.update()
        for cell in todo:
            bar.set_postfix_str(cell.id)
            path = cell.path(out)
            if not _run(_cell_command(spec, cell, path), path.with_suffix(".error.txt")):
                failures.append(f"{cell.id}: " + path.with_suffix(".error.txt").read_text().strip())
            bar.update()
    return failures


def read_cells(spec: BenchSpec, out: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``{(task, row): [cell results over seeds]}`` for every cell file present."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for task in spec.tasks:
        for row in spec.rows:
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
