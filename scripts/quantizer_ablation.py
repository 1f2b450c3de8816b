"""Quantizer-learning ablation on a real model: FP, min-max, +LSQ, +Quadapter, per bit width.

Every variant quantizes the same teacher on the same data-free inputs (random tokens) and is scored by
the same evaluation (the validate stage's code) on the task data named in the config. Usage:

    python scripts/quantizer_ablation.py configs/bench/stsb.yaml --seeds 0 --seeds 1 --seeds 2 \
        --out docs/ablation_quantizers.md
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import click
import torch

from calib.inputs import random_tokens
from calib.learn import learn_quantizers
from calib.models import TaskModel, load_backbone, load_source_tokenizer
from calib.student import build_student, init_ranges
from exporters.metrics import cosine_rows
from exporters.validation import build_eval_inputs, evaluate_torch
from pipeline.config import (
    ActivationQuant,
    LearnConfig,
    QuadapterConfig,
    QuantConfig,
    WeightQuant,
    load_config,
)
from pipeline.stages.calibrate import special_token_ids


def variants(bits: int, steps: int, positions: str, alpha: float, group_size: int | None) -> dict[str, QuantConfig]:
    """The ablation ladder for one weight bit width (activations int8 throughout); int4 per group if asked."""
    grouped = bits == 4 and group_size is not None
    weights = WeightQuant(
        bits=bits, granularity="per-group" if grouped else "per-channel", group_size=group_size if grouped else None
    )
    acts = ActivationQuant(bits=8, init="minmax")
    learn = LearnConfig(steps=steps, lr=1e-2, params=("step-sizes", "quadapter"))
    return {
        "min-max": QuantConfig(weights=weights, activations=acts),
        "+LSQ": QuantConfig(weights=weights, activations=acts, learn=learn),
        "+Quadapter": QuantConfig(
            weights=weights,
            activations=acts,
            learn=learn,
            quadapter=QuadapterConfig(enabled=True, positions=positions, init="smoothquant", alpha=alpha),
        ),
    }


def _mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


@click.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--bits", "bit_widths", multiple=True, type=int, default=(8, 4), show_default=True)
@click.option("--seeds", multiple=True, type=int, default=(0,), show_default=True, help="Random-token seeds.")
@click.option("--steps", type=int, default=200, show_default=True, help="Learning steps for +LSQ / +Quadapter.")
@click.option("--samples", type=int, default=256, show_default=True)
@click.option("--positions", type=click.Choice(["foldable", "all"]), default="all", show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="SmoothQuant alpha of the Quadapter init.")
@click.option("--group-size", type=int, default=None, help="int4 weights in groups of this size (default per channel).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def main(
    config_path: Path,
    bit_widths: tuple[int, ...],
    seeds: tuple[int, ...],
    steps: int,
    samples: int,
    positions: str,
    alpha: float,
    group_size: int | None,
    out: Path,
) -> None:
    """Run the ladder for each bit width and seed and write a Markdown table (mean ± std over seeds)."""
    config = load_config(config_path)
    teacher = TaskModel(load_backbone(config.model, config.task), config.task.kind).eval()
    tokenizer = load_source_tokenizer(config.model)
    vocab = teacher.backbone.config.vocab_size
    specials, pad = special_token_ids(tokenizer)
    inputs, fallback = build_eval_inputs(config, tokenizer, vocab)
    if fallback:
        raise click.ClickException(f"the ablation needs task data: {fallback}")
    fp_value, fp_outputs = evaluate_torch(teacher, config, inputs)
    click.echo(f"FP32: {fp_value:.2f}")
    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for seed in seeds:
        tokens = random_tokens(samples, config.calib.seq_len, vocab, seed, specials, pad)
        batches = tokens.batches(config.calib.batch_size)
        for bits in bit_widths:
            for name, quant in variants(bits, steps, positions, alpha, group_size).items():
                started = time.perf_counter()
                torch.manual_seed(seed)
                student = build_student(teacher, quant)
                init_ranges(student, quant, batches)
                learn_quantizers(teacher, student, batches, quant.learn, show_progress=True)
                minutes = (time.perf_counter() - started) / 60
                value, outputs = evaluate_torch(student, config, inputs)
                cosine = float(cosine_rows(outputs, fp_outputs).mean())
                results.setdefault((bits, name), []).append((value, cosine, minutes))
                click.echo(f"seed {seed} W{bits}A8 {name}: {value:.2f}, cosine to FP {cosine:.4f} ({minutes:.1f} min)")
    metric = config.task.eval.metric if config.task.eval else "metric"
    lines = [
        f"| variant | scheme | {metric} | cosine to FP outputs | minutes |",
        "|---|---|---|---|---|",
        f"| FP32 | — | {fp_value:.2f} | 1.0000 | — |",
    ]
    for (bits, name), runs in results.items():
        values, cosines, minutes = zip(*runs)
        lines.append(
            f"| {name} | W{bits}A8 | {_mean_std(list(values), 2)} | {_mean_std(list(cosines), 4)} "
            f"| {statistics.mean(minutes):.1f} |"
        )
    note = (
        f"\nModel {config.model.describe()}; calibration: {samples} random-token sequences of {config.calib.seq_len}, "
        f"seeds {', '.join(map(str, seeds))} (mean ± std over seeds); weights "
        f"{f'int4 in groups of {group_size}' if group_size else 'per-channel'}, activations per-tensor "
        f"int8 (min-max init); learning: {steps} steps, lr 1e-2, KL/MSE distillation; Quadapter positions: "
        f"{positions}, SmoothQuant init (alpha {alpha}).\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n" + note, encoding="utf-8")
    click.echo(out.read_text())


if __name__ == "__main__":
    main()
