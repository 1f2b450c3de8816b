"""``zsaq-pipeline serve``: a run's CPU student behind a real Triton server (PyTriton) on 127.0.0.1, taking
and refusing what the repository's text ensemble does (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from calib.errors import PipelineError, StageUnavailable
from calib.models import load_saved_tokenizer
from exporters.cpu_kernels import ort_session
from exporters.triton_repo import (
    ONNX_MODEL,
    TEXT_ENSEMBLE,
    TEXT_INPUT,
    label_names,
    serving_limits,
)
from exporters.triton_tokenizer_model import classify, decode_texts, encode

MODEL_NAME = TEXT_ENSEMBLE[ONNX_MODEL]
HOST = "127.0.0.1"


@dataclass
class ServedModel:
    """Text in, the task's outputs out: tokenizer, the CPU student on ONNX Runtime, post-processing."""

    graph: Path
    session: ort.InferenceSession
    tokenizer: Any
    task_kind: str
    labels: tuple[str, ...]
    max_batch_size: int
    max_length: int

    def __call__(self, text: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for one request's BYTES tensor ([texts, 1]); raises InvalidRequest for what it refuses."""
        ids, mask = encode(self.tokenizer, decode_texts(text), self.max_length)
        output = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        if self.task_kind == "classification":
            names, scores = classify(output, list(self.labels))
            return {"label": names, "scores": scores}
        return {self.session.get_outputs()[0].name: output}

    def output_specs(self) -> list[tuple[str, type, tuple[int, ...]]]:
        """(name, dtype, shape without the batch axis) of each output, as PyTriton declares them."""
        if self.task_kind == "classification":
            return [("label", bytes, (1,)), ("scores", np.float32, (len(self.labels),))]
        output = self.session.get_outputs()[0]
        shape = tuple(d if isinstance(d, int) else -1 for d in output.shape[1:])
        return [(output.name, np.float32, shape)]


def load_served_model(
    graph: Path, model_dir: Path, task_kind: str, num_labels: int, shapes: list, threads: int = 0
) -> ServedModel:
    """The CPU student graph with the tokenizer saved in ``model_dir``; one-line errors for what is missing."""
    if not graph.is_file():
        raise PipelineError(f"no CPU student graph {graph}; run the pipeline into the run folder first")
    tokenizer = load_saved_tokenizer(model_dir)
    if tokenizer is None:
        raise PipelineError(f"{model_dir}: the model has no tokenizer, and serve takes raw text")
    session = ort_session(graph, threads or os.cpu_count() or 1)
    max_batch, max_length = serving_limits(shapes)
    labels = label_names(model_dir, num_labels) if task_kind == "classification" else ()
    return ServedModel(graph, session, tokenizer, task_kind, labels, max_batch, max_length)


def require_pytriton() -> None:
    """PyTriton and the Triton client come with the ``serve`` extra."""
    for module in ("pytriton", "tritonclient.http"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            raise StageUnavailable(f"serve needs PyTriton and tritonclient: pip install -e '.[serve]' ({module})")


def _with_libpython() -> None:
    """PyTriton's Python backend links the interpreter's libpython: its folder must be on LD_LIBRARY_PATH."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir, *paths])


class TextServer:
    """A PyTriton server for a :class:`ServedModel` on 127.0.0.1 (HTTP only); use it as a context manager."""

    def __init__(self, model: ServedModel, port: int, log_file: Path) -> None:
        self.model, self.port, self.log_file = model, port, log_file
        self.url = f"{HOST}:{port}"
        self._triton: Any = None

    def __enter__(self) -> TextServer:
        require_pytriton()
        with socket.socket() as probe:
            try:
                probe.bind((HOST, self.port))
            except OSError:
                raise PipelineError(f"port {self.port} on {HOST} is in use; pass another with --port") from None
        from pytriton.model_config import ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig

        _with_libpython()
        # refused requests go back to the client; PyTriton would also log each one with its traceback
        logging.getLogger("pytriton.proxy.inference").setLevel(logging.ERROR)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        config = TritonConfig(
            http_address=HOST, http_port=self.port, allow_grpc=False, allow_metrics=False, log_file=self.log_file
        )
        self._triton = Triton(config=config)
        outputs = [Tensor(name=name, dtype=dtype, shape=shape) for name, dtype, shape in self.model.output_specs()]
        self._triton.bind(
            model_name=MODEL_NAME,
            infer_func=self._infer,
            inputs=[Tensor(name=TEXT_INPUT, dtype=bytes, shape=(1,))],
            outputs=outputs,
            config=ModelConfig(max_batch_size=self.model.max_batch_size, batcher=None),
            strict=True,
        )
        try:
            self._triton.run()
        except BaseException:
            self._triton.stop()
            raise
        return self

    def _infer(self, requests: list) -> list[dict[str, np.ndarray]]:
        return [self.model(request[TEXT_INPUT]) for request in requests]

    def wait(self) -> None:
        """Serve until SIGINT (Ctrl-C) or SIGTERM, or until the server dies."""
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self._triton.is_alive() and not stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def __exit__(self, *_: object) -> None:
        self._triton.stop()


# --- bounded loopback load check -------------------------------------------------------------------------

LOAD_TEXTS = (
    "A man is playing a guitar.",
    "The new movie is awesome, everyone should see it.",
    "Three dogs run across a snowy field.",
    "Stocks fell sharply after the report.",
    "She is reading a book in the garden while it rains.",
    "The cat sleeps.",
    "How do I reset my password?",
    "A woman slices an onion on a wooden board.",
)
CONCURRENCY = (1, 4, 16)
REFUSAL_MARKER = "InvalidRequest: "


def infer_texts(client: Any, texts: list[str], outputs: list[str]) -> dict[str, np.ndarray]:
    """One request with ``texts`` as a [n, 1] BYTES tensor; the named outputs as numpy arrays."""
    from tritonclient.http import InferInput

    tensor = InferInput(TEXT_INPUT, [len(texts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_))
    result = client.infer(MODEL_NAME, [tensor])
    return {name: result.as_numpy(name) for name in outputs}


def same_answer(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    """Equal labels, and float outputs within 1e-4."""
    for name, expected in want.items():
        value = got.get(name)
        if value is None or value.shape != expected.shape:
            return False
        if expected.dtype == np.object_:
            if not all(bytes(a) == bytes(b) for a, b in zip(value.reshape(-1), expected.reshape(-1))):
                return False
        elif not np.allclose(value, expected, atol=1e-4, rtol=1e-4):
            return False
    return True


@dataclass
class LoadLevel:
    """One concurrency level: what was sent and answered, latency percentiles and throughput."""

    concurrency: int
    planned: int
    sent: int = 0
    ok: int = 0
    errors: int = 0
    wrong: int = 0
    lost: int = 0
    seconds: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput_rps: float = 0.0

    @property
    def passed(self) -> bool:
        """Every planned request sent inside the time limit and answered right."""
        return self.sent == self.planned == self.ok


def _worker(url: str, level: LoadLevel, state: dict[str, Any], want: list[dict], outputs: list[str]) -> list[float]:
    from tritonclient.http import InferenceServerClient
    from tritonclient.utils import InferenceServerException

    latencies = []
    client = InferenceServerClient(url, connection_timeout=10.0, network_timeout=state["time_limit"])
    try:
        while True:
            with state["lock"]:
                if state["next"] >= level.planned or time.monotonic() > state["deadline"]:
                    return latencies
                index = state["next"]
                state["next"] += 1
                level.sent += 1
            text = LOAD_TEXTS[index % len(LOAD_TEXTS)]
            start = time.perf_counter()
            try:
                got = infer_texts(client, [text], outputs)
                outcome = "ok" if same_answer(got, want[index % len(LOAD_TEXTS)]) else "wrong"
            except InferenceServerException as exc:
                outcome = "errors" if exc.status() else "lost"
            except Exception:  # a dropped connection or a timeout: the request is lost
                outcome = "lost"
            latencies.append((time.perf_counter() - start) * 1000.0)
            with state["lock"]:
                setattr(level, outcome, getattr(level, outcome) + 1)
    finally:
        client.close()


def run_level(url: str, model: ServedModel, concurrency: int, requests: int, time_limit_s: float) -> LoadLevel:
    """``requests`` one-text requests from ``concurrency`` clients in closed loop, stopped at ``time_limit_s``."""
    from concurrent.futures import ThreadPoolExecutor

    want = [model(np.array([[t.encode("utf-8")]], dtype=np.object_)) for t in LOAD_TEXTS]
    outputs = [name for name, _, _ in model.output_specs()]
    level = LoadLevel(concurrency, requests)
    state = {
        "lock": threading.Lock(),
        "next": 0,
        "deadline": time.monotonic() + time_limit_s,
        "time_limit": time_limit_s,
    }
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(_worker, url, level, state, want, outputs) for _ in range(concurrency)]
        latencies = [ms for future in futures for ms in future.result()]
    level.seconds = round(time.perf_counter() - start, 3)
    if latencies:
        level.p50_ms = round(float(np.percentile(latencies, 50)), 2)
        level.p99_ms = round(float(np.percentile(latencies, 99)), 2)
    level.throughput_rps = round(level.ok / level.seconds, 2) if level.seconds else 0.0
    return level


def error_line(message: str) -> str:
    """The reason in a Triton error message (PyTriton wraps a refusal in its tracebacks)."""
    if REFUSAL_MARKER in message:
        return message.rsplit(REFUSAL_MARKER, 1)[1].split("\n", 1)[0]
    return message.strip().split("\n", 1)[0]


def malformed_requests(url: str, model: ServedModel) -> list[dict[str, Any]]:
    """Send each kind of bad request; record the status and the reason the server gave."""
    from tritonclient.http import InferenceServerClient, InferInput
    from tritonclient.utils import InferenceServerException

    too_long = " ".join(["word"] * (2 * model.max_length))
    cases: list[tuple[str, str, np.ndarray]] = [
        ("wrong dtype (INT64 text)", "INT64", np.array([[7]], dtype=np.int64)),
        ("empty text", "BYTES", np.array([[b""]], dtype=np.object_)),
        ("invalid UTF-8", "BYTES", np.array([[b"\xff\xfe"]], dtype=np.object_)),
        (f"over-long text ({2 * model.max_length} words)", "BYTES", np.array([[too_long.encode()]], dtype=np.object_)),
    ]
    outputs = [name for name, _, _ in model.output_specs()]
    results = []
    with InferenceServerClient(url, network_timeout=60.0) as client:
        for name, datatype, data in cases:
            tensor = InferInput(TEXT_INPUT, list(data.shape), datatype)
            tensor.set_data_from_numpy(data)
            try:
                client.infer(MODEL_NAME, [tensor])
                result = {"request": name, "status": "200", "error": None}
            except InferenceServerException as exc:
                result = {"request": name, "status": exc.status(), "error": error_line(exc.message())}
            try:
                result["served_after"] = bool(infer_texts(client, [LOAD_TEXTS[0]], outputs))
            except InferenceServerException:
                result["served_after"] = False
            results.append(result)
    return results


def load_check(
    server: TextServer, requests: int, time_limit_s: float, concurrency: tuple[int, ...] = CONCURRENCY
) -> dict[str, Any]:
    """The bounded load check and the malformed requests against a running server; the report as a dict."""
    from importlib import metadata

    from tritonclient.http import InferenceServerClient

    with InferenceServerClient(server.url) as client:
        triton_version = client.get_server_metadata()["version"]
    levels = [run_level(server.url, server.model, c, requests, time_limit_s) for c in concurrency]
    malformed = malformed_requests(server.url, server.model)
    refused = all(m["error"] and m["served_after"] for m in malformed)
    return {
        "model": MODEL_NAME,
        "graph": str(server.model.graph),
        "server": f"Triton {triton_version} (nvidia-pytriton {metadata.version('nvidia-pytriton')}), HTTP on {HOST}",
        "cpus": os.cpu_count(),
        "requests_per_level": requests,
        "time_limit_s": time_limit_s,
        "levels": [{**level.__dict__, "passed": level.passed} for level in levels],
        "malformed": malformed,
        "passed": all(level.passed for level in levels) and refused,
    }


def render_load_markdown(report: dict[str, Any]) -> str:
    """The serving section of the run's reports."""
    lines = [
        f"# Serving check: {report['model']} on {report['server']}",
        "",
        f"- Model: `{report['graph']}` behind PyTriton; one text per request, client threads on the same "
        f"{report['cpus']} CPUs as the server",
        f"- {report['requests_per_level']} requests per concurrency level, stopped at {report['time_limit_s']} s; "
        "answers compared with the model run in-process (1e-4)",
        f"- Result: {'passed' if report['passed'] else 'FAILED'}",
        "",
        "| concurrency | sent | ok | errors | wrong | lost | p50 ms | p99 ms | throughput req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in report["levels"]:
        cells = [level[k] for k in ("concurrency", "sent", "ok", "errors", "wrong", "lost", "p50_ms", "p99_ms")]
        lines.append("| " + " | ".join(str(c) for c in cells) + f" | {level['throughput_rps']} |")
    lines += ["", "## Malformed requests", "", "| request | status | error | served after |", "|---|---|---|---|"]
    for case in report["malformed"]:
        lines.append(f"| {case['request']} | {case['status']} | {case['error']} | {case['served_after']} |")
    return "\n".join(lines) + "\n"


def write_load_report(report: dict[str, Any], json_path: Path, markdown_path: Path) -> None:
    """The load check as JSON and as Markdown."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    markdown_path.write_text(render_load_markdown(report), encoding="utf-8")
