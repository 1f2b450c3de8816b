"""Score a decoder run's cached graphs against a peer: the same teacher built by ONNX Runtime GenAI's model builder
(int4, CPU), side by side in one process, each model in its own ONNX Runtime session:

- WikiText-2 perplexity: the test text tokenized as one stream, the first ``--windows`` non-overlapping windows of
  ``--seq-len`` tokens, each window one full-sequence call (exp of the mean next-token NLL);
- prefill (``batch x --past`` prompt) and next-token latency on a cache of ``--past`` tokens at batch 1 and 4,
  the models taking turns (:func:`exporters.decoding.decode_latencies`), and decode tokens/s;
- size on disk: the graph and its external data.

The peer is built once from the run's ``teacher/model`` into ``--out/genai_int4_cpu`` (its own ``.gitignore``
keeps it out of git). Writes ``decoder_peers.json`` and ``decoder_peers.md`` into ``--out``:

    python scripts/decoder_peers.py runs/smollm2 --threads 2
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx

from calib.task_data import token_windows
from exporters.cpu_kernels import machine_description
from exporters.decoding import OrtStepper, decode_latencies, run_full_sequence
from exporters.genai_peer import build_peer, genai_graph, genai_stepper, graph_bytes
from exporters.metrics import token_nll
from pipeline.layout import ORT_DYNAMIC_ONNX, STUDENT_ONNX, TEACHER_MODEL, TEACHER_ONNX

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "decoder_peers"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
NAME = "decoder_peers"
PEER = "genai_int4_cpu"
BATCHES = (1, 4)
EVAL_BATCH = 4
OURS = {
    TEACHER_ONNX.name: "FP32 teacher",
    STUDENT_ONNX["cpu"].name: "W8A16 data-free student (QDQ, CPU flavour)",
    ORT_DYNAMIC_ONNX.name: "ONNX Runtime quantize_dynamic int8 of the FP32 graph",
}


def run_graphs(run: Path) -> dict[str, Path]:
    """The run's CPU cached graphs that exist: FP32, the W8A16 student, int4 weight-only, ORT dynamic int8."""
    export = TEACHER_ONNX.path(run).parent
    names = [TEACHER_ONNX.name, STUDENT_ONNX["cpu"].name]
    names += sorted(p.name for p in export.glob("teacher_w4a16_g*_cpu.onnx")) + [ORT_DYNAMIC_ONNX.name]
    return {name.removesuffix(".onnx"): export / name for name in names if (export / name).is_file()}


def nbits_settings(path: Path) -> str:
    """The first MatMulNBits' bits, block size and accuracy level, or '' for a graph without one."""
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            level = attrs.get("accuracy_level", 0)
            return f"int{attrs['bits']} MatMulNBits, block {attrs['block_size']}, accuracy_level {level}"
    return ""


def describe(name: str, path: Path) -> str:
    """One line on what a row is."""
    base = "ONNX Runtime GenAI model builder" if name == PEER else OURS.get(path.name, "W4A16 round-to-nearest teacher")
    nbits = nbits_settings(path)
    return f"{base} ({nbits})" if nbits else base


def corpus_windows(hf_folder: Path, data: Path, count: int, seq_len: int) -> np.ndarray:
    """The first ``count`` non-overlapping ``seq_len``-token windows of ``data`` tokenized as one stream."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder))
    windows = token_windows(tokenizer, data.read_text(encoding="utf-8"), seq_len, count)
    if len(windows) < count:
        raise click.ClickException(f"{data}: {len(windows)} windows of {seq_len} tokens, fewer than {count}")
    return windows


def perplexity(stepper: OrtStepper, windows: np.ndarray) -> float:
    """exp(mean next-token NLL) over the windows, :data:`EVAL_BATCH` windows per full-sequence call."""
    nll, count = 0.0, 0
    for start in range(0, len(windows), EVAL_BATCH):
        ids = windows[start : start + EVAL_BATCH]
        mask = np.ones_like(ids)
        batch_nll, batch_count = token_nll(run_full_sequence(stepper.session, ids, mask, stepper.layout), ids, mask)
        nll, count = nll + batch_nll, count + batch_count
    return float(np.exp(nll / count))


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _arguments() -> list[str]:
    """This command's arguments, every option spelled out."""
    params = click.get_current_context().params
    options = [f"--{name.replace('_', '-')}={value}" for name, value in params.items() if name != "run"]
    return [str(params["run"]), *options]


def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table and how it was made."""
    settings = result["settings"]
    lines = [
        "# Decoder graphs against a peer",
        "",
        f"CPU: {result['machine']}; intra-op threads: {settings['threads']}; onnxruntime {result['onnxruntime']}, "
        f"onnxruntime-genai {result['onnxruntime_genai']}. Perplexity: {settings['data']}, the first "
        f"{settings['windows']} windows of {settings['seq_len']} tokens (one stream). Latency: prefill of a "
        f"batch x {settings['past']} prompt and one next token on a cache of {settings['past']}, medians, the "
        "models taking turns.",
        "",
        "| model | what | perplexity | prefill b1 ms | prefill b4 ms | decode b1 ms | tokens/s b1 | decode b4 ms "
        "| tokens/s b4 | size MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["models"].items():
        b1, b4 = row["latency"]
        lines.append(
            f"| {name} | {row['what']} | {row['perplexity']:.3f} | {b1['prefill_ms']:.1f} | {b4['prefill_ms']:.1f} | "
            f"{b1['decode_ms']:.2f} | {b1['tokens_per_second']:.1f} | {b4['decode_ms']:.2f} | "
            f"{b4['tokens_per_second']:.1f} | {row['size_mb']:.1f} |"
        )
    build = result["peer_build"]
    lines += [
        "",
        f"Peer build ({build['seconds']} s): `{build['command']}`",
        "",
        f"This table: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


@click.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--windows", type=click.IntRange(1), default=32, show_default=True, help="Perplexity windows.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="Intra-op threads per session.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=DEFAULT_DATA)
@click.option("--seq-len", type=click.IntRange(2), default=256, show_default=True, help="Perplexity window length.")
@click.option("--past", type=click.IntRange(1), default=256, show_default=True, help="Cache length for decode timing.")
@click.option("--repeats", type=click.IntRange(1), default=30, show_default=True, help="Timed decode calls.")
def main(run: Path, windows: int, threads: int, out: Path, data: Path, seq_len: int, past: int, repeats: int) -> None:
    """Score RUN's cached decoder graphs and an ONNX Runtime GenAI int4 CPU build of its teacher."""
    teacher = TEACHER_MODEL.path(run)
    if not (teacher / "config.json").is_file():
        raise click.ClickException(f"{run}: no {teacher.relative_to(run)}/config.json (run the teacher stage)")
    try:
        build = build_peer(teacher, out / PEER, "int4")
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    (build.folder / ".gitignore").write_text("*\n", encoding="utf-8")
    paths = {**run_graphs(run), PEER: genai_graph(build.folder)}
    steppers = {name: OrtStepper(path, threads) for name, path in paths.items() if name != PEER}
    steppers[PEER] = genai_stepper(build.folder, threads)
    ids = corpus_windows(teacher, data, windows, seq_len)
    scores = {name: perplexity(stepper, ids) for name, stepper in steppers.items()}
    latencies = decode_latencies(steppers, BATCHES, past, repeats)
    result = {
        "machine": machine_description(),
        "onnxruntime": _version("onnxruntime"),
        "onnxruntime_genai": _version("onnxruntime-genai"),
        "command": shlex.join(["python", "scripts/decoder_peers.py", *_arguments()]),
        "settings": {"threads": threads, "windows": windows, "seq_len": seq_len, "past": past, "data": str(data)},
        "peer_build": {"command": build.command, "seconds": build.seconds},
        "models": {
            name: {
                "what": describe(name, path),
                "path": str(path),
                "perplexity": round(scores[name], 4),
                "latency": [{**asdict(lat), "tokens_per_second": lat.tokens_per_second} for lat in latencies[name]],
                "size_mb": round(graph_bytes(path) / 2**20, 1),
            }
            for name, path in paths.items()
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / f"{NAME}.md").write_text(markdown(result), encoding="utf-8")
    click.echo(markdown(result))


if __name__ == "__main__":
    main()
