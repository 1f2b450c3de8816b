"""Size the data-free calibration on this CPU: seconds and peak memory of one SAM-SGA round and of the quantize
stage's learning (end-to-end and block-wise), for random-init models of real shapes, against their parameters.

Each shape runs in its own subprocess, so every peak belongs to one shape. Inside it, the resident-set high-water
mark (``VmHWM``) is reset before each phase (``/proc/self/clear_refs``), so each phase has its own peak: what was
resident when it started (the teacher, the student, whatever the allocator kept) plus what it added. A phase that
does not fit under ``--mem-limit-gib`` (an address-space limit set in the subprocess) is reported as out of memory
and the next phase still runs. Writes ``size_cost.json``, ``size_cost.md`` and ``size_cost.png`` into ``--out``.
Usage (the lead's full measurement, on an otherwise idle machine):

    python scripts/size_cost.py --shapes bert-base,bert-large,llama-1b --out docs/size_cost
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

GIB = 1024**3
DEFAULT_SHAPES = ("bert-base", "bert-large", "llama-1b")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "size_cost"
NAME = "size_cost"


@dataclass(frozen=True)
class Shape:
    """A random-init model shape: transformers sizes (as :class:`calib.config.RandomModel` fields), the task
    head, and the quantization it is measured under (``w8a8``, or ``w4g128``: int4 weights per group of 128,
    int8 activations)."""

    family: str
    kind: str
    sizes: dict[str, int]
    quant: str
    note: str = ""


SHAPES: dict[str, Shape] = {
    "bert-base": Shape(
        "bert", "classification",
        {"layers": 12, "hidden": 768, "heads": 12, "intermediate": 3072, "vocab_size": 30522, "max_positions": 512},
        "w8a8", "BERT-base (bert-base-uncased's shape)",
    ),
    "bert-large": Shape(
        "bert", "classification",
        {"layers": 24, "hidden": 1024, "heads": 16, "intermediate": 4096, "vocab_size": 30522, "max_positions": 512},
        "w8a8", "BERT-large (bert-large-uncased's shape)",
    ),
    # TinyLlama-1.1B rather than Llama-3.2-1B: its 32k vocabulary (not 128k) keeps the generator's soft tokens,
    # the LM head and the KL over the vocabulary from dominating a "1B blocks" measurement
    "llama-1b": Shape(
        "llama", "causal-lm",
        {"layers": 22, "hidden": 2048, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab_size": 32000,
         "max_positions": 2048},
        "w4g128", "TinyLlama-1.1B's shape (grouped-query attention, 4 key/value heads)",
    ),
    # a smaller shape to estimate the others' runtime from (about a minute on one core)
    "bert-small": Shape(
        "bert", "classification",
        {"layers": 4, "hidden": 512, "heads": 8, "intermediate": 2048, "vocab_size": 30522, "max_positions": 512},
        "w8a8", "BERT-small (google/bert_uncased_L-4_H-512's shape)",
    ),
    # smoke-test shapes (seconds in total)
    "tiny": Shape(
        "bert", "classification",
        {"layers": 2, "hidden": 128, "heads": 2, "intermediate": 512, "vocab_size": 2048, "max_positions": 512},
        "w8a8", "a ~1M-parameter BERT for smoke tests",
    ),
    "tiny-llama": Shape(
        "llama", "causal-lm",
        {"layers": 2, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 768, "vocab_size": 4096,
         "max_positions": 512},
        "w4g128", "a ~4M-parameter Llama for smoke tests",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """What every shape is measured with (the same for all shapes of one run)."""

    threads: int
    seq_len: int = 128
    batch_size: int = 4
    rounds: int = 2
    steps: int = 2
    init_samples: int = 8
    mem_limit_gib: float = 0.0  # 0: no limit

    def worker_args(self) -> list[str]:
        """These settings as the command-line options that give them back."""
        return [
            "--threads", str(self.threads), "--seq-len", str(self.seq_len), "--batch-size", str(self.batch_size),
            "--rounds", str(self.rounds), "--steps", str(self.steps), "--init-samples", str(self.init_samples),
            "--mem-limit-gib", f"{self.mem_limit_gib:g}",
        ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int | None:
    """A ``VmHWM``/``VmRSS``-style line of /proc/self/status, in KiB (None off Linux)."""
    try:
        text = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def rss_gib() -> float:
    """The resident set now."""
    kib = _status_kib("VmRSS")
    return (kib or 0) / 1024**2


def reset_peak() -> bool:
    """Reset the resident high-water mark to the current resident set (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def peak_gib() -> float:
    """The resident high-water mark since the last :func:`reset_peak` (``ru_maxrss`` where ``VmHWM`` is missing:
    then the peak of the whole process so far)."""
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024**2


_PEAKS: list[float] = []  # every phase's (and round's) peak so far: the resets clear ``ru_maxrss`` too


def note_peak() -> float:
    """The peak since the last reset, remembered for :func:`process_peak_gib`."""
    value = peak_gib()
    _PEAKS.append(value)
    return value


def process_peak_gib() -> float:
    """The peak resident set of this whole process: the largest of the peaks noted between resets, of
    ``ru_maxrss`` and of the current ``VmHWM`` (on Linux, resetting ``VmHWM`` also lowers ``ru_maxrss``)."""
    return max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, peak_gib(), *_PEAKS])


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation refused (by the address-space limit or the system), as Python or PyTorch reports it."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "allocate" in str(exc).lower())


@dataclass
class Phase:
    """One timed phase: its seconds, its own resident peak, the resident set when it started and ended, and
    ``error`` (out of memory, or skipped) when it did not complete."""

    seconds: float | None = None
    peak_gib: float | None = None
    rss_start_gib: float | None = None
    rss_end_gib: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def phase(record: dict[str, Phase], name: str, limit_gib: float) -> Iterator[Phase]:
    """Time a phase and take its resident peak; an out-of-memory error is recorded, not raised."""
    gc.collect()
    reset_peak()
    current = record[name] = Phase(rss_start_gib=rss_gib())
    started = time.perf_counter()
    try:
        yield current
    except Exception as exc:  # only memory errors are results; anything else is a bug, raised
        if not is_out_of_memory(exc):
            raise
        limit = f" (address-space limit {limit_gib:g} GiB)" if limit_gib else ""
        asked = re.search(r"allocate (\d+) bytes", str(exc))
        what = f"{int(asked.group(1)) / GIB:.3g} GiB more refused" if asked else str(exc).strip()[:160]
        current.error = f"out of memory{limit}: {what}"
    finally:
        current.peak_gib = max(note_peak(), current.rss_start_gib)  # RSS counters lag by a few pages
        _PEAKS.append(current.peak_gib)  # so the process peak is never below a phase's
        if current.error is None:
            current.seconds = time.perf_counter() - started
        gc.collect()
        current.rss_end_gib = rss_gib()


# ---------------------------------------------------------------------------------------------- one shape


def measure_shape(
    name: str,
    settings: Settings,
    show_progress: bool = True,
    on_phase: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Build the shape's random teacher, then time (a) the student with ranges from generated batches, (b) the
    quantize stage's block-wise learning for one pass (one step per block), (c) the SAM-SGA rounds, (d) its
    end-to-end learning for ``settings.steps`` steps. ``on_phase`` gets the partial result after every phase."""
    import torch

    from calib.config import (
        CalibConfig,
        GeneratorConfig,
        LearnConfig,
        ModelSource,
        QuantConfig,
        RandomModel,
        SamSgaConfig,
        TaskConfig,
        WeightQuant,
    )
    from calib.learn import learn_quantizers
    from calib.models import count_parameters, frozen_teacher, load_backbone
    from calib.sam_sga import SamSga
    from calib.student import build_student, init_ranges, quant_layers
    from calib.zsaq import build_generator, generated_set

    shape = SHAPES[name]
    torch.set_num_threads(settings.threads)
    quant = QuantConfig()
    if shape.quant == "w4g128":
        quant = QuantConfig(weights=WeightQuant(bits=4, granularity="per-group", group_size=128))
    calib = CalibConfig(
        samples=settings.init_samples, seq_len=settings.seq_len, batch_size=settings.batch_size, seed=0,
        generator=GeneratorConfig(kind="soft-tokens", batch_size=settings.batch_size,
                                  min_len=min(16, settings.seq_len)),
        sam_sga=SamSgaConfig(rounds=settings.rounds, checkpoint_every=1),
    )  # fmt: skip
    phases: dict[str, Phase] = {}
    result: dict[str, Any] = {
        "shape": name, "family": shape.family, "kind": shape.kind, "sizes": shape.sizes, "quant": shape.quant,
        "note": shape.note, "threads": torch.get_num_threads(), "phases": phases,
    }  # fmt: skip
    limit = settings.mem_limit_gib

    def done(label: str) -> None:
        item = phases[label]
        took = "" if item.seconds is None else f"{item.seconds:.2f} s, "
        print(f"[{name}] {label}: {took}peak {item.peak_gib:.2f} GiB" + (f" ({item.error})" if item.error else ""),
              flush=True)  # fmt: skip
        if on_phase is not None:
            on_phase(to_json(result))

    def skipped(*labels: str) -> dict[str, Any]:
        for label in labels:
            phases[label] = Phase(error="skipped: an earlier phase did not complete")
        return result

    print(f"[{name}] building the random teacher ({shape.note})", flush=True)
    task = TaskConfig(kind=shape.kind)
    with phase(phases, "build_teacher", limit) as current:
        teacher = frozen_teacher(load_backbone(ModelSource(random=RandomModel(shape.family, **shape.sizes)), task),
                                 task.kind)  # fmt: skip
        result["params"] = count_parameters(teacher)
        current.extra["params"] = result["params"]
    done("build_teacher")
    rest = ("student", "teacher_forward", "learn_block_wise", "sam_sga", "learn_end_to_end")
    if phases["build_teacher"].error:
        return skipped(*rest)

    rng = torch.Generator().manual_seed(0)
    with phase(phases, "student", limit) as current:
        generator = build_generator(calib, teacher, ())
        student = build_student(teacher, quant)
        init_ranges(student, quant, generated_set(generator, calib.samples, calib.batch_size, rng).batches(
            calib.batch_size))  # fmt: skip
        layers = quant_layers(student)
        result["quantized_params"] = sum(layer.weight.numel() for layer in layers.values())
        result["generator_params"] = sum(p.numel() for p in generator.parameters())
        current.extra.update(quantized_layers=len(layers), init_batches=-(-calib.samples // calib.batch_size))
    done("student")
    if phases["student"].error:
        return skipped(*rest[1:])

    # the fixed batch the quantize stage learns on, and one teacher forward on it (what its cache saves)
    learn_batch = generated_set(generator, settings.batch_size, settings.batch_size, rng).batches(
        settings.batch_size)  # fmt: skip
    with phase(phases, "teacher_forward", limit), torch.no_grad():
        learn_batch[0].run(teacher, output_hidden_states=True)
    done("teacher_forward")

    # block-wise first: a phase that ran out of memory before it would leave the allocator's retained heap in
    # its peak (it needs the least memory of the three)
    with phase(phases, "learn_block_wise", limit) as current:
        config = LearnConfig(steps=shape.sizes["layers"], mode="block-wise")  # one step per block
        learned = learn_quantizers(teacher, student, learn_batch, config, show_progress)
        current.extra.update(steps=len(learned.losses), stopped_early=learned.stopped_early)
    done("learn_block_wise")

    with phase(phases, "sam_sga", limit) as current:
        game = SamSga(teacher, student, generator, calib, quant.learn, rng)
        marks = [(time.perf_counter(), 0.0, 0.0)]
        round_peaks: list[float] = []

        def round_done() -> None:  # called after every round but the last
            history = game.history
            marks.append((time.perf_counter(), history.generator_seconds, history.student_seconds))
            round_peaks.append(note_peak())
            reset_peak()

        game.play(settings.rounds, round_done, show_progress)
        round_done()
        current.extra["round_seconds"] = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
        current.extra["generator_seconds"] = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
        current.extra["student_seconds"] = [b[2] - a[2] for a, b in zip(marks, marks[1:])]
        current.extra["round_peak_gib"] = round_peaks
    if round_peaks := phases["sam_sga"].extra.get("round_peak_gib"):  # at least its starting RSS, as phase() keeps
        phases["sam_sga"].peak_gib = max(*round_peaks, phases["sam_sga"].rss_start_gib)
    done("sam_sga")
    for param in student.parameters():
        param.requires_grad_(False)

    with phase(phases, "learn_end_to_end", limit) as current:
        learned = learn_quantizers(teacher, student, learn_batch, LearnConfig(steps=settings.steps), show_progress)
        current.extra.update(steps=len(learned.losses), stopped_early=learned.stopped_early)
    done("learn_end_to_end")
    return result


def to_json(value: Any) -> Any:
    """Dataclasses (phases) as plain dictionaries, recursively."""
    if isinstance(value, Phase):
        return asdict(value)
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- summary


def per_step(result: dict[str, Any], label: str) -> float | None:
    """Seconds per learning step with the teacher's outputs cached: the phase's seconds less its one teacher
    forward, over its steps."""
    item = result["phases"].get(label) or {}
    steps = (item.get("extra") or {}).get("steps")
    if item.get("seconds") is None or not steps:
        return None
    teacher = (result["phases"].get("teacher_forward") or {}).get("seconds") or 0.0
    return max(item["seconds"] - teacher, 0.0) / steps


def metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """The numbers the table, the plot and the fits take from one shape's result."""
    phases = result["phases"]

    def get(label: str, key: str) -> float | None:
        item = phases.get(label) or {}
        return item.get(key) if item.get("error") is None else None

    game = (phases.get("sam_sga") or {}).get("extra") or {}
    rounds = game.get("round_seconds") or []
    complete = bool(rounds) and (phases.get("sam_sga") or {}).get("error") is None
    return {
        "build_s": get("build_teacher", "seconds"),
        "student_s": get("student", "seconds"),
        "teacher_forward_s": get("teacher_forward", "seconds"),
        "round_first_s": rounds[0] if complete else None,
        "round_s": rounds[-1] if complete else None,  # the last round: past any first-call costs
        "round_generator_s": game["generator_seconds"][-1] if complete else None,
        "round_student_s": game["student_seconds"][-1] if complete else None,
        "sam_sga_gib": get("sam_sga", "peak_gib"),
        "e2e_step_s": per_step(result, "learn_end_to_end"),
        "e2e_gib": get("learn_end_to_end", "peak_gib"),
        "block_step_s": per_step(result, "learn_block_wise"),
        "block_pass_s": get("learn_block_wise", "seconds"),
        "block_gib": get("learn_block_wise", "peak_gib"),
        "process_peak_gib": result.get("process_peak_gib"),
    }


GROWTH = {
    "round_s": ("seconds per SAM-SGA round", "s"),
    "sam_sga_gib": ("peak GiB during SAM-SGA", "GiB"),
    "e2e_step_s": ("seconds per end-to-end learning step", "s"),
    "e2e_gib": ("peak GiB of end-to-end learning", "GiB"),
    "block_step_s": ("seconds per block-wise learning step", "s"),
    "block_gib": ("peak GiB of block-wise learning", "GiB"),
}


def fit_growth(params: list[float], values: list[float | None]) -> dict[str, float] | None:
    """Least-squares fits over the shapes that have a value: the log-log slope (the exponent b of value ~
    params^b) and the linear coefficient per billion parameters (value ~ a + c * params / 1e9). None with fewer
    than two shapes of distinct sizes."""
    points = [(p, v) for p, v in zip(params, values) if v is not None and v > 0 and p > 0]
    if len({p for p, _ in points}) < 2:
        return None

    def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        return b, my - b * mx

    exponent, _ = slope([math.log(p) for p, _ in points], [math.log(v) for _, v in points])
    per_billion, intercept = slope([p / 1e9 for p, _ in points], [v for _, v in points])
    return {"exponent": exponent, "per_billion": per_billion, "intercept": intercept, "shapes": len(points)}


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s, from /proc/cpuinfo), or the platform's word for it."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the numbers come from."""
    import torch

    kib = _meminfo_kib("MemTotal")
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": None if kib is None else round(kib / 1024**2, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _meminfo_kib(key: str) -> int | None:
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each shape's metrics and the growth fits across shapes."""
    rows = [metrics(r) for r in results]
    params = [float(r.get("params") or 0) for r in results]
    return {"metrics": rows, "growth": {key: fit_growth(params, [m[key] for m in rows]) for key in GROWTH}}


QUANT_WORDS = {
    "w8a8": "W8A8 (int8 weights per output channel, int8 activations)",
    "w4g128": "W4A8 (int4 weights per group of 128, int8 activations)",
}


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _failure(result: dict[str, Any], label: str) -> str:
    error = (result["phases"].get(label) or {}).get("error") or ""
    return "OOM" if error.startswith("out of memory") else "—"


def growth_lines(summary: dict[str, Any]) -> list[str]:
    """One sentence per fitted metric."""
    lines = []
    for key, (words, unit) in GROWTH.items():
        fit = summary["growth"][key]
        if fit is None:
            lines.append(f"- {words}: fewer than two shapes have it, no fit")
            continue
        per = f"{fit['per_billion']:.3g} {unit} per billion parameters (intercept {fit['intercept']:.3g} {unit})"
        lines.append(f"- {words} grows as params^{fit['exponent']:.2f} (log-log slope over {fit['shapes']} shapes); "
                     f"linear fit: {per}")  # fmt: skip
    return lines


def markdown(results: list[dict[str, Any]], summary: dict[str, Any], info: dict[str, Any]) -> str:
    """The report: command, machine, settings, the table, growth and how memory was measured."""
    settings = info["settings"]
    head = (
        "| shape | params | threads | CPU | build s | student + ranges s | teacher fwd s | SAM-SGA s/round "
        "(last) | SAM-SGA peak GiB | quantize end-to-end s/step | peak GiB | quantize block-wise s/step "
        "(pass s) | peak GiB | process peak GiB |"
    )
    lines = [
        "# Size: cost of SAM-SGA and of the quantize stage against model size",
        "",
        f"Made by `{info['command']}` on {info['date']}.",
        "",
        f"Machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, "
        f"{info['machine']['memory_gib']} GiB memory; torch {info['machine']['torch']}.",
        f"Settings: {settings['threads']} thread(s); random-init models; generator `soft-tokens`, batch "
        f"{settings['batch_size']} x {settings['seq_len']} tokens; {settings['rounds']} SAM-SGA rounds (1 generator "
        f"+ 1 SAM student step each); range init on {settings['init_samples']} generated samples; the quantize "
        f"stage learns on one batch of {settings['batch_size']} x {settings['seq_len']}: {settings['steps']} "
        "end-to-end steps, then one block-wise pass (one step per block); step sizes learned, no Quadapter. "
        + "; ".join(f"{r['shape']}: {QUANT_WORDS[r['quant']]}" for r in results if r.get("quant"))
        + "."
        + (f" Address-space limit per shape: {settings['mem_limit_gib']:g} GiB." if settings["mem_limit_gib"] else ""),
        "",
        head,
        "|" + "---|" * head.count(" | ") + "---|",
    ]
    for result, m in zip(results, summary["metrics"]):
        round_cell = (f"{_num(m['round_s'])} (1st {_num(m['round_first_s'])}; generator {_num(m['round_generator_s'])}"
                      f" + student {_num(m['round_student_s'])})" if m["round_s"] is not None
                      else _failure(result, "sam_sga"))  # fmt: skip
        e2e = _num(m["e2e_step_s"]) if m["e2e_step_s"] is not None else _failure(result, "learn_end_to_end")
        block = (f"{_num(m['block_step_s'])} ({_num(m['block_pass_s'], 1)})" if m["block_step_s"] is not None
                 else _failure(result, "learn_block_wise"))  # fmt: skip
        params = result.get("params")
        cells = [
            f"{result['shape']}", "—" if params is None else f"{params / 1e6:.1f} M", str(result.get("threads", "—")),
            info["machine"]["cpu"], _num(m["build_s"], 1), _num(m["student_s"], 1), _num(m["teacher_forward_s"]),
            round_cell, _peak_cell(result, "sam_sga"), e2e, _peak_cell(result, "learn_end_to_end"), block,
            _peak_cell(result, "learn_block_wise"), _num(m["process_peak_gib"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Growth against parameters", "", *growth_lines(summary), ""]
    failures = [
        f"- {r['shape']} {label}: {item['error']}"
        for r in results
        for label, item in r["phases"].items()
        if item.get("error")
    ] + [f"- {r['shape']}: {r['worker_error']}" for r in results if r.get("worker_error")]
    if failures:
        lines += ["## Phases that did not complete", "", *failures, ""]
    lines += [
        "## How it was measured",
        "",
        "- Each shape runs in its own process. Before each phase the resident high-water mark is reset "
        "(`/proc/self/clear_refs`), so a phase's peak is the resident set at its start (teacher, student, "
        "generator, what the allocator kept) plus what it added; `process peak` is the largest of the shape's "
        "phase peaks and `ru_maxrss`. A phase that ran out of memory shows its peak at the moment it failed.",
        "- SAM-SGA s/round: the last round's wall time (the first round's too), split into the generator's ascent "
        "step and the student's SAM step (two forward-backward passes); the peak is over all rounds.",
        "- Quantize s/step: the phase's seconds less one teacher forward (its outputs are cached after the first "
        "step), over its steps. The block-wise pass takes one step per block.",
        "- Block-wise learning runs one block per step on cached inputs (calib/block_calls.py): per pass, the "
        "teacher's blocks once (about one teacher forward, subtracted as above) and the student's once more to "
        "make each next block's inputs; it is measured before SAM-SGA and end-to-end learning so that their "
        "memory (kept by the allocator after a phase fails) does not count in its peak.",
        "- Parameters: every parameter of the float teacher once (tied ones once), embeddings included.",
    ]
    return "\n".join(lines) + "\n"


def _peak_cell(result: dict[str, Any], label: str) -> str:
    """A phase's peak; marked where it is the point at which memory ran out."""
    oom = _failure(result, label) == "OOM"
    return _num(_peak(result, label)) + (" at OOM" if oom else "")


def _peak(result: dict[str, Any], label: str) -> float | None:
    """A phase's peak, also when it failed (then: where it stood when the allocation was refused)."""
    return (result["phases"].get(label) or {}).get("peak_gib")


def plot(results: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Seconds and GiB against parameters, log-log, two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [r.get("params") for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    series = (
        (left, "round_s", "SAM-SGA round", "o-"),
        (left, "e2e_step_s", "quantize: end-to-end step", "s-"),
        (left, "block_step_s", "quantize: block-wise step", "^-"),
        (left, "build_s", "random init (not a round)", "x:"),
        (right, "sam_sga_gib", "SAM-SGA", "o-"),
        (right, "e2e_gib", "quantize: end-to-end", "s-"),
        (right, "block_gib", "quantize: block-wise", "^-"),
    )
    for axis, key, label, style in series:
        points = [(p, m[key]) for p, m in zip(params, summary["metrics"]) if p and m[key]]
        if not points:
            continue
        fit = summary["growth"].get(key)
        suffix = f" (~params^{fit['exponent']:.2f})" if fit else ""
        axis.plot(*zip(*sorted(points)), style, label=label + suffix)
    failed = [
        (result["params"], result["phases"][label]["peak_gib"])
        for result in results
        for label in ("sam_sga", "learn_end_to_end", "learn_block_wise")
        if result.get("params") and _failure(result, label) == "OOM" and _peak(result, label)
    ]
    if failed:
        right.plot(*zip(*failed), "rx", markersize=10, label="out of memory (peak when refused)")
    for axis, ylabel in ((left, "seconds"), (right, "peak resident GiB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
        for result, p in zip(results, params):
            if p:
                axis.axvline(p, color="grey", lw=0.5, alpha=0.5)
                axis.annotate(result["shape"], (p, 1), xycoords=("data", "axes fraction"), fontsize=7,
                              rotation=90, va="top", ha="right")  # fmt: skip
    threads = results[0].get("threads") if results else "?"
    fig.suptitle(f"SAM-SGA and quantize-stage cost against size ({cpu_model()}, {threads} thread(s))")
    fig.tight_layout()
    with _replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- files, processes


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``, moved onto it when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write through a temporary name: a reader never sees half a file."""
    with _replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_outputs(results: list[dict[str, Any]], info: dict[str, Any], out: Path) -> dict[str, Any]:
    """``size_cost.json``, ``.md`` and ``.png`` into ``out``; returns the summary."""
    summary = summarise(results)
    document = {**info, "results": results, "summary": summary}
    write_text(out / f"{NAME}.json", json.dumps(document, indent=2) + "\n")
    write_text(out / f"{NAME}.md", markdown(results, summary, info))
    plot(results, summary, out / f"{NAME}.png")
    return summary


def run_worker(name: str, settings: Settings, show_progress: bool) -> dict[str, Any]:
    """``name`` measured in a fresh Python process (its own peak), with its thread count and memory limit;
    the partial result survives a process the system kills."""
    with tempfile.TemporaryDirectory(prefix="size-cost-") as folder:
        partial = Path(folder) / "result.json"
        threads = str(settings.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(partial),
                   *settings.worker_args(), *([] if show_progress else ["--quiet"])]  # fmt: skip
        code = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], check=False).returncode
        result = json.loads(partial.read_text(encoding="utf-8")) if partial.is_file() else None
    if result is None:
        result = {"shape": name, "threads": settings.threads, "phases": {}}
    if code != 0:
        why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        result["worker_error"] = (
            f"the measuring process ended early ({why}); phases after the last recorded are missing"
        )
    return result


def run_as_worker(name: str, settings: Settings, out: Path, show_progress: bool) -> None:
    """The subprocess side: limit the address space, measure, write the result after every phase."""
    if settings.mem_limit_gib:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = int(settings.mem_limit_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))

    def save(partial: dict[str, Any]) -> None:
        write_text(out, json.dumps({**partial, "process_peak_gib": process_peak_gib()}, indent=2))

    result = measure_shape(name, settings, show_progress, on_phase=save)
    save(to_json(result))


def measure_all(names: list[str], settings: Settings, isolate: bool, show_progress: bool) -> list[dict[str, Any]]:
    """Every shape, each in its own process (``isolate``) or one after another in this one."""
    results = []
    for name in names:
        started = time.perf_counter()
        print(f"== {name}: {SHAPES[name].note}", flush=True)
        if isolate:
            result = run_worker(name, settings, show_progress)
        else:
            result = to_json(measure_shape(name, settings, show_progress))
            result["process_peak_gib"] = process_peak_gib()
        result["wall_seconds"] = time.perf_counter() - started
        print(f"== {name}: done in {result['wall_seconds']:.1f} s", flush=True)
        results.append(result)
    return results


def command_line(names: list[str], settings: Settings, out: Path) -> str:
    """The command that makes these files again (paths relative to the repository where they can be)."""
    root = Path(__file__).resolve().parents[1]
    shown = out.resolve()
    shown = shown.relative_to(root) if shown.is_relative_to(root) else shown
    args = ["python", "scripts/size_cost.py", "--shapes", ",".join(names), "--out", str(shown), *settings.worker_args()]
    return shlex.join(args)


def default_mem_limit() -> float:
    """85 % of the machine's memory, in GiB (0: unknown, no limit)."""
    kib = _meminfo_kib("MemTotal")
    return 0.0 if kib is None else round(0.85 * kib / 1024**2, 1)


def parse_shapes(value: str) -> list[str]:
    """A comma-separated list of known shape names."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        raise click.BadParameter(f"unknown shape(s) {', '.join(unknown) or '(none)'}; known: {', '.join(SHAPES)}")
    return names


@click.command()
@click.option(
    "--shapes",
    default=",".join(DEFAULT_SHAPES),
    show_default=True,
    help=f"Comma-separated shapes: {', '.join(SHAPES)}.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_OUT,
    help="Folder for size_cost.json, .md and .png (default: docs/size_cost).",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=os.cpu_count() or 1,
    show_default=True,
    help="PyTorch (and OpenMP) threads.",
)
@click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Generator batch per step, range-init batch and the quantize stage's learning batch.",
)
@click.option("--rounds", type=click.IntRange(1), default=2, show_default=True, help="SAM-SGA rounds.")
@click.option("--steps", type=click.IntRange(1), default=2, show_default=True, help="End-to-end learning steps.")
@click.option(
    "--init-samples",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Generated samples the ranges are initialised on.",
)
@click.option(
    "--mem-limit-gib",
    type=click.FloatRange(0),
    default=default_mem_limit(),
    show_default=True,
    help="Address-space limit per shape's process (0: none): a phase over it is reported out of memory.",
)
@click.option("--in-process", is_flag=True, help="Measure in this process (peaks then include earlier shapes).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--worker", hidden=True)
@click.option("--worker-out", type=click.Path(dir_okay=False, path_type=Path), hidden=True)
def main(
    shapes: str,
    out: Path,
    threads: int,
    seq_len: int,
    batch_size: int,
    rounds: int,
    steps: int,
    init_samples: int,
    mem_limit_gib: float,
    in_process: bool,
    quiet: bool,
    worker: str | None,
    worker_out: Path | None,
) -> None:
    """Measure each shape, write the table, the JSON and the plot, and print how the costs grow."""
    settings = Settings(threads, seq_len, batch_size, rounds, steps, init_samples, mem_limit_gib)
    if worker is not None:
        run_as_worker(worker, settings, worker_out, not quiet)
        return
    names = parse_shapes(shapes)
    info = {
        "command": command_line(names, settings, out),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": asdict(settings),
        "shapes": {n: asdict(SHAPES[n]) for n in names},
    }
    results = measure_all(names, settings, isolate=not in_process, show_progress=not quiet)
    summary = write_outputs(results, info, out)
    for line in growth_lines(summary):
        print(line)
    print(f"wrote {out / (NAME + '.md')}, {NAME}.json and {NAME}.png")


if __name__ == "__main__":
    main()
