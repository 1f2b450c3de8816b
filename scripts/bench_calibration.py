"""Data-free calibration benchmark: ZSAQ (SAM-SGA) against the baselines, per bit width, over seeds.

Every method quantizes the same teacher with the same quantizer and the same number of student steps:
ZSAQ's student steps come from the SAM-SGA game; each baseline distils (LSQ, the quantize stage's loop)
for as many steps on its own fixed inputs ("QAT on random inputs" in ZSAQ's tables). Usage:

    python scripts/bench_calibration.py configs/bench/sst2.yaml --bits 4 --bits 8 --seeds 0 1 2 \\
        --methods zsaq random-tokens gaussian-embeds --out docs/bench_calibration_sst2.md

Beside the task metric each run records its fidelity to the FP model on the same evaluation inputs:
the share of predictions equal to FP's (classifiers) or the mean cosine to FP's outputs (embeddings). A
dev set's accuracy moves both ways as predictions flip; fidelity counts every flip, so it separates
calibration methods with less noise.

``--rounds`` changes the student-step budget (every method's); ``--weights-lr`` also learns the weights
(QAT, as in ZSAQ's own tables) at that rate relative to their magnitude. ``--real-data FILE`` adds the
``real-data`` method: the same distillation on ``calib.samples`` sentences of a task's *training* file,
the ceiling any data-free method can hope to reach at this budget (flagged in the table; never a result).
``--frozen-generator`` runs ZSAQ's ``adversarial: false`` ablation: what the generator's inputs give
without the ascent.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import time
from pathlib import Path

import click
import numpy as np
import torch

from calib.learn import learn_quantizers
from calib.models import TaskModel, load_backbone, load_source_tokenizer
from calib.student import build_student, init_ranges
from calib.zsaq import calibrate_zsaq
from exporters.metrics import agreement
from exporters.validation import build_eval_inputs, evaluate_torch
from pipeline.config import PipelineConfig, load_config
from pipeline.stages.calibrate import baseline_inputs, special_token_ids

DATA_FREE = ("zsaq", "random-tokens", "gaussian-embeds")
METHODS = (*DATA_FREE, "real-data")
UPPER_BOUND = "real-data (upper bound: reads task training data)"


def quantize_with(method: str, config: PipelineConfig, teacher: TaskModel, tokenizer):  # noqa: ANN001, ANN201
    """The quantized student a method produces (same quantizer, same student-step budget)."""
    calib = config.calib
    steps = calib.sam_sga.rounds * calib.sam_sga.student_steps
    if method == "zsaq":
        game, _ = calibrate_zsaq(config, teacher, special_token_ids(tokenizer)[0], tokenizer=tokenizer)
        return game.student
    samples = baseline_inputs(config, teacher, tokenizer)
    batches = samples.batches(calib.generator.batch_size)
    torch.manual_seed(calib.seed)
    student = build_student(teacher, config.quant)
    init_ranges(student, config.quant, batches)
    learn = dataclasses.replace(config.quant.learn, steps=steps)
    learn_quantizers(teacher, student, batches, learn, show_progress=True)
    return student


def with_overrides(
    config: PipelineConfig,
    rounds: int | None,
    weights_lr: float | None,
    real_data: Path | None = None,
    frozen_generator: bool = False,
) -> PipelineConfig:
    """The config with the command line's budget, weight learning, real-data file and ablation applied."""
    calib, learn = config.calib, config.quant.learn
    if frozen_generator:
        calib = dataclasses.replace(calib, sam_sga=dataclasses.replace(calib.sam_sga, adversarial=False))
    if real_data is not None:
        calib = dataclasses.replace(calib, real_data=str(real_data.resolve()))
    if rounds is not None:
        calib = dataclasses.replace(calib, sam_sga=dataclasses.replace(calib.sam_sga, rounds=rounds))
    if weights_lr is not None:
        params = tuple(dict.fromkeys([*learn.params, "weights"]))
        learn = dataclasses.replace(learn, params=params, weights_lr=weights_lr)
    return dataclasses.replace(config, calib=calib, quant=dataclasses.replace(config.quant, learn=learn))


def fidelity_to_fp(fp_outputs: np.ndarray, outputs: np.ndarray, kind: str) -> float:
    """Percent of predictions equal to FP's (classifiers), or 100 x mean cosine to FP's outputs."""
    measures = agreement(fp_outputs, outputs, kind)
    return 100 * measures.get("argmax_match", measures["mean_cosine"])


def fidelity_name(kind: str) -> str:
    """The fidelity column's heading for a task kind."""
    return "cosine to FP x100" if kind == "embedding" else "agreement with FP %"


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


@click.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--bits", "bit_widths", multiple=True, type=int, default=(4, 8), show_default=True)
@click.option("--seeds", "seeds", multiple=True, type=int, default=(0, 1, 2), show_default=True)
@click.option("--methods", "methods", multiple=True, type=click.Choice(METHODS), default=DATA_FREE)
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="student steps (default: the config's)")
@click.option("--weights-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="also learn the weights, at this relative rate")  # fmt: skip
@click.option("--real-data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="task training file for the real-data upper bound")  # fmt: skip
@click.option("--frozen-generator", is_flag=True,
              help="ZSAQ's ablation adversarial: false (the generator never ascends)")  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def main(
    config_path: Path,
    bit_widths: tuple[int, ...],
    seeds: tuple[int, ...],
    methods: tuple[str, ...],
    rounds: int | None,
    weights_lr: float | None,
    real_data: Path | None,
    frozen_generator: bool,
    out: Path,
) -> None:
    """Write a Markdown table (FP, each method x bit width, mean ± std over seeds) and a JSON of every run."""
    if "real-data" in methods and real_data is None:
        raise click.UsageError("--methods real-data needs --real-data FILE (a task training file)")
    base = with_overrides(load_config(config_path), rounds, weights_lr, real_data, frozen_generator)
    teacher = TaskModel(load_backbone(base.model, base.task), base.task.kind).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    tokenizer = load_source_tokenizer(base.model)
    inputs, fallback = build_eval_inputs(base, tokenizer, teacher.backbone.config.vocab_size)
    if fallback:
        raise click.ClickException(f"the benchmark needs task data: {fallback}")
    fp_metric, fp_outputs = evaluate_torch(teacher, base, inputs)
    runs = []
    for bits in bit_widths:
        for method in methods:
            for seed in seeds:
                quant = dataclasses.replace(base.quant, weights=dataclasses.replace(base.quant.weights, bits=bits))
                calib = dataclasses.replace(base.calib, seed=seed, method=method)
                config = dataclasses.replace(base, quant=quant, calib=calib)
                started = time.perf_counter()
                student = quantize_with(method, config, teacher, tokenizer)
                minutes = (time.perf_counter() - started) / 60
                metric, outputs = evaluate_torch(student, config, inputs)
                fidelity = fidelity_to_fp(fp_outputs, outputs, base.task.kind)
                runs.append(
                    {"bits": bits, "method": method, "seed": seed, "metric": metric, "fidelity": fidelity,
                     "minutes": minutes}
                )  # fmt: skip
                click.echo(f"W{bits}A8 {method} seed {seed}: {metric:.2f}, fidelity {fidelity:.2f} ({minutes:.1f} min)")
                write_table(out, base, fp_metric, runs)  # after every run: a stopped benchmark keeps its rows
    click.echo(out.read_text())


def write_table(out: Path, base: PipelineConfig, fp_metric: float, runs: list[dict]) -> None:
    """Markdown table (FP, each method x bit width that ran, mean ± std over seeds) and a JSON of every run."""
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    lines = [
        f"| method | scheme | {base.task.eval.metric} (mean ± std) | {fidelity_name(base.task.kind)} | seeds "
        "| minutes / run |",
        "|---|---|---|---|---|---|",
    ]
    lines.append(f"| FP32 teacher | — | {fp_metric:.2f} | 100 | — | — |")
    for bits, method in dict.fromkeys((r["bits"], r["method"]) for r in runs):
        picked = [r for r in runs if r["bits"] == bits and r["method"] == method]
        minutes = statistics.mean(r["minutes"] for r in picked)
        values = _mean_std([r["metric"] for r in picked])
        fidelity = _mean_std([r["fidelity"] for r in picked])
        name = UPPER_BOUND if method == "real-data" else method
        if method == "zsaq":
            name = f"zsaq ({base.calib.generator.kind})"
            if not base.calib.sam_sga.adversarial:
                name += ", generator frozen (adversarial: false)"
        lines.append(f"| {name} | W{bits}A8 | {values} | {fidelity} | {len(picked)} | {minutes:.1f} |")
    sga = base.calib.sam_sga
    lines += [
        "",
        f"Model {base.model.describe()}, task data {base.task.eval.data} (evaluation only). Every method: "
        f"{sga.rounds} student steps, weights {base.quant.weights.granularity} {base.quant.weights.init}, "
        f"int8 activations, learnable {learnable(base)}, calibration seq_len "
        f"{base.calib.seq_len}, generator batch {base.calib.generator.batch_size}. Peak RSS {peak_gib:.2f} GiB.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"fp": fp_metric, "runs": runs}, indent=2) + "\n")


def learnable(config: PipelineConfig) -> str:
    """``step-sizes, weights (rate 0.001)``: what the student learns, with the weights' own rate if set."""
    learn = config.quant.learn
    names = [f"weights (rate {learn.weights_lr:g})" if p == "weights" and learn.weights_lr else p for p in learn.params]
    return ", ".join(names)


if __name__ == "__main__":
    main()
