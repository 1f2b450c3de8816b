"""``zsaq-pipeline generate``: decode from a run's exported graph through ONNX Runtime, streaming text as it
comes (the tokenizer is the one the teacher stage saved)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from calib.errors import ConfigError
from calib.models import load_saved_tokenizer
from exporters.cpu_kernels import ort_session
from exporters.decoding import OrtStepper, Sampling, generate, graph_cache_layout
from pipeline.layout import TEACHER_MODEL
from pipeline.runfolder import RunFolder


@dataclass(frozen=True)
class GenerationStats:
    """What one generation took: prompt tokens and the prompt's call, new tokens and their decoding time."""

    prompt_tokens: int
    prefill_seconds: float
    new_tokens: int
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Tokens decoded on the cache per second (the first new token comes with the prompt's call)."""
        return (self.new_tokens - 1) / self.decode_seconds if self.new_tokens > 1 and self.decode_seconds > 0 else 0.0


def run_graphs(run_dir: Path) -> dict[str, Path]:
    """The run's exported ONNX graphs by name (file stem)."""
    folder = RunFolder(run_dir)
    if not folder.is_run_folder():
        raise ConfigError(f"{run_dir}: not a zsaq-pipeline run folder (no manifest.json)")
    return {path.stem: path for path in sorted(folder.stage_dir("export").glob("*.onnx"))}


def open_decoder(run_dir: Path, model: str, threads: int) -> OrtStepper:
    """The named graph of the run as a cached decoder; one-line errors for a missing graph or an encoder run."""
    graphs = run_graphs(run_dir)
    if model not in graphs:
        available = ", ".join(graphs) or "none: run the export stage"
        raise ConfigError(f"--model: {run_dir} has no exported graph {model!r} (available: {available})")
    session = ort_session(graphs[model], threads or None)
    if graph_cache_layout(session) is None:
        raise ConfigError(f"--model: {model} has no KV cache: only a causal-LM run generates")
    return OrtStepper(session)


def stream_text(
    run_dir: Path,
    prompt: str,
    model: str,
    max_new_tokens: int,
    sampling: Sampling,
    threads: int,
    chat: bool,
    emit: Callable[[str], None],
) -> GenerationStats:
    """Generate from ``prompt`` and ``emit`` the prompt (on a line of its own for a chat), then the text as it
    grows (a character is held back while its UTF-8 bytes are incomplete); stops at the tokenizer's
    end-of-sequence token. Every refusal comes before anything is emitted."""
    if not prompt.strip():
        raise ConfigError("prompt: expected some text, got an empty prompt")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected 1 or more, got {max_new_tokens}")
    stepper = open_decoder(run_dir, model, threads)
    tokenizer = load_saved_tokenizer(RunFolder(run_dir).stage_dir(TEACHER_MODEL.stage) / TEACHER_MODEL.name)
    if tokenizer is None:
        raise ConfigError(f"{run_dir}: the run has no tokenizer (a random model): nothing to read a prompt with")
    if chat:
        if not tokenizer.chat_template:
            raise ConfigError("--chat: the model's tokenizer has no chat template")
        message = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template holds the specials
    else:
        ids = list(tokenizer(prompt)["input_ids"])
    emit(prompt + ("\n" if chat else ""))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    first_token_at = start
    for tokens in generate(stepper, [ids], max_new_tokens, pad, tokenizer.eos_token_id, sampling):
        if not new:
            first_token_at = time.perf_counter()
        token = int(tokens[0])
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            emit(text[len(shown) :])
            shown = text
    end = time.perf_counter()
    return GenerationStats(len(ids), first_token_at - start, len(new), end - first_token_at)
