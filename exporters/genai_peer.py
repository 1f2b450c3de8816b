"""A peer for the exported decoder graphs: the same Hugging Face model built by ONNX Runtime GenAI's model builder
(``python -m onnxruntime_genai.models.builder``; needs ``onnxruntime-genai`` and ``onnx-ir``) and run on plain
ONNX Runtime through :class:`exporters.decoding.OrtStepper`.

The builder's graph keeps the cache names of :mod:`exporters.decoding` but reads no ``position_ids``: its
GroupQueryAttention derives positions from the attention mask, which holds for rows without padding only. Its
cache inputs leave the head width symbolic (``kv_cache_dim``), so the layout comes from ``genai_config.json``."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from exporters.decoding import CacheLayout, OrtStepper

BUILDER = "onnxruntime_genai.models.builder"
CONFIG = "genai_config.json"
BUILD_RECORD = "build.json"
EXPECTED_NAMES = {
    "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value",
    "present_key_names": "present.%d.key",
    "present_value_names": "present.%d.value",
}


@dataclass(frozen=True)
class PeerBuild:
    """A finished build: its folder, the builder's command line and how long it ran."""

    folder: Path
    command: str
    seconds: float


def builder_command(hf_folder: Path, out: Path, precision: str, cache_dir: Path) -> list[str]:
    """The model builder's command line for a CPU graph of ``precision`` (int4, int8, fp32, ...)."""
    folders = ["-i", str(hf_folder), "-o", str(out), "-c", str(cache_dir)]
    return [sys.executable, "-m", BUILDER, *folders, "-p", precision, "-e", "cpu"]


def build_peer(hf_folder: Path, out: Path, precision: str) -> PeerBuild:
    """Build ``hf_folder`` into ``out`` unless a finished build is there (its ``build.json``); the builder's output
    goes to ``out/build.log``, and a failure raises with its last line."""
    record = out / BUILD_RECORD
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        return PeerBuild(out, saved["command"], saved["seconds"])
    if not (hf_folder / "config.json").is_file():
        raise FileNotFoundError(f"{hf_folder}: no config.json (not a Hugging Face model folder)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        command = builder_command(hf_folder, out, precision, Path(cache_dir))
        start = time.perf_counter()
        offline = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a local folder only: never the hub
        done = subprocess.run(command, capture_output=True, text=True, env=offline)
        seconds = round(time.perf_counter() - start, 1)
    (out / "build.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise RuntimeError(f"{BUILDER} failed (exit {done.returncode}): {lines[-1]}")
    build = PeerBuild(out, shlex.join(command), seconds)
    record.write_text(json.dumps({"command": build.command, "seconds": seconds}, indent=2), encoding="utf-8")
    return build


def _decoder_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG} (not an ONNX Runtime GenAI model folder)")
    decoder = json.loads(path.read_text(encoding="utf-8"))["model"]["decoder"]
    names = {**decoder["inputs"], **decoder["outputs"]}
    wrong = {key: names.get(key) for key, want in EXPECTED_NAMES.items() if names.get(key) != want}
    if wrong:
        raise ValueError(f"{path}: cache names {wrong} differ from exporters.decoding's")
    return decoder


def genai_layout(folder: Path) -> CacheLayout:
    """The cache layout ``genai_config.json`` declares."""
    decoder = _decoder_config(folder)
    return CacheLayout(decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"])


def genai_graph(folder: Path) -> Path:
    """The decoder graph of a GenAI model folder."""
    return folder / _decoder_config(folder)["filename"]


def genai_stepper(folder: Path, threads: int | None = None) -> OrtStepper:
    """The folder's decoder graph as a cache stepper (unpadded rows only, see the module docstring)."""
    return OrtStepper(genai_graph(folder), threads, genai_layout(folder))


def graph_bytes(path: Path) -> int:
    """Bytes of an ONNX graph file and the external data files its initializers name."""
    graph = onnx.load(str(path), load_external_data=False).graph
    locations = {
        entry.value
        for tensor in graph.initializer
        for entry in tensor.external_data
        if tensor.data_location == onnx.TensorProto.EXTERNAL and entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in locations)
