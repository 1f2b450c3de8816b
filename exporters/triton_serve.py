"""What ``zsaq-pipeline serve`` puts behind Triton: a repository with one Python-backend model, ``student_text``
(raw text in; tokenizer, the CPU student graph on ONNX Runtime and post-processing in one model), with Triton's
dynamic batcher set from the validate stage's measured batch latencies (docs/ARCHITECTURE.md, Serving)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.http_front_door import FrontDoor
from exporters.triton_python_model import TextModel
from exporters.triton_repo import (
    PYTHON_MODEL,
    TEXT_INPUT,
    Enum,
    TensorSpec,
    graph_io,
    text_outputs,
    write_config,
)
from exporters.triton_server import HOST, Ports, TritonServer, free_ports

MODEL_NAME = "student_text"
UNBATCHED_MODEL = "student_text_unbatched"  # the same model without the batcher: the load check's comparison
BATCHING_PAYS = 1.2  # a batch size is preferred when it computes this many times batch 1's items per second
QUEUE_DELAY_SHARE = 0.1  # then a lone request waits at most this share of its own batch-1 latency for company
MAX_QUEUE_DELAY_US = 5000


@dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher: the batch sizes it waits for and how long it may hold a request for them."""

    preferred: tuple[int, ...]
    queue_delay_us: int

    def config(self) -> dict[str, Any]:
        """The ``dynamic_batching`` message."""
        message: dict[str, Any] = {"max_queue_delay_microseconds": self.queue_delay_us}
        if self.preferred:
            message["preferred_batch_size"] = list(self.preferred)
        return message

    def describe(self) -> str:
        """One line for the console and the report."""
        preferred = ", ".join(map(str, self.preferred)) or "none"
        return f"dynamic batching: preferred batch sizes {preferred}, queue delay {self.queue_delay_us} us"


def batching_policy(latencies: Sequence[dict[str, Any]], max_batch_size: int) -> Batching:
    """The batcher for a model whose validated latencies are ``[{batch, p50_ms, throughput}, ...]``.

    Under load, requests queue behind the running batch and the batcher merges them with no delay at all,
    which spreads the per-request cost (the Python stub's round trip, the tokenizer call, the session launch)
    over the batch. A queue delay only pays when the measurements show a bigger batch computing more items per
    second: then the batch sizes that do (by :data:`BATCHING_PAYS`) are preferred, and a lone request waits at
    most a tenth of its batch-1 latency (at most 5 ms) for company. Otherwise, and without measurements, no
    preferred sizes and no delay: a lone request is never held back."""
    by_batch = {int(entry["batch"]): entry for entry in latencies if int(entry["batch"]) <= max_batch_size}
    single = by_batch.get(1)
    if single is None:
        return Batching((), 0)
    pays = tuple(
        sorted(b for b, e in by_batch.items() if b > 1 and e["throughput"] >= BATCHING_PAYS * single["throughput"])
    )
    if not pays:
        return Batching((), 0)
    return Batching(pays, min(MAX_QUEUE_DELAY_US, round(QUEUE_DELAY_SHARE * float(single["p50_ms"]) * 1000.0)))


@dataclass(frozen=True)
class ServeSpec:
    """A run's CPU student as ``serve`` serves it."""

    graph: Path
    tokenizer_dir: Path
    task_kind: str
    labels: tuple[str, ...]
    max_batch_size: int
    max_length: int
    threads: int  # ONNX Runtime intra-op threads; 0: all cores
    batching: Batching | None

    def reference_model(self) -> TextModel:
        """The served model loaded in this process, the reference the load check compares answers with. One
        ONNX Runtime thread: a thread pool here would spin beside the server's while perf_analyzer measures."""
        return TextModel.load(
            str(self.graph), str(self.tokenizer_dir), self.task_kind, list(self.labels), self.max_length, 1
        )


def _text_model_config(name: str, spec: ServeSpec, outputs: list[TensorSpec], batching: Batching | None) -> dict:
    parameters = {
        "mode": "text",
        "graph": str(spec.graph.resolve()),
        "tokenizer": str(spec.tokenizer_dir.resolve()),
        "task_kind": spec.task_kind,
        "labels": json.dumps(list(spec.labels)),
        "max_length": str(spec.max_length),
        "threads": str(spec.threads),
    }
    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": spec.max_batch_size,
        "input": [TensorSpec(TEXT_INPUT, "TYPE_STRING", (1,)).config()],
        "output": [t.config() for t in outputs],
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": [{"key": k, "value": {"string_value": v}} for k, v in parameters.items()],
    }
    if batching is not None:
        config["dynamic_batching"] = batching.config()
    return config


def write_serve_repository(root: Path, spec: ServeSpec, with_unbatched: bool = False) -> list[str]:
    """The repository under ``root`` (the graph and tokenizer stay in the run folder); returns its model names.
    ``with_unbatched`` adds :data:`UNBATCHED_MODEL`, the same model without the dynamic batcher."""
    outputs = text_outputs(graph_io(spec.graph)[1], spec.task_kind)
    variants = {MODEL_NAME: spec.batching}
    if with_unbatched:
        variants[UNBATCHED_MODEL] = None
    for name, batching in variants.items():
        write_config(root / name, _text_model_config(name, spec, outputs, batching))
        shutil.copy(PYTHON_MODEL, root / name / "1" / "model.py")
    return list(variants)


@dataclass(frozen=True)
class Endpoints:
    """Where a running server answers (all on loopback)."""

    http: str  # host:port, the front door
    grpc: str  # host:port, Triton's own
    metrics: str  # URL of the metrics text


class Serving:
    """Triton over ``repository`` with the HTTP front door before it: a context manager yielding
    :class:`Endpoints`. Triton's own HTTP and metrics ports are private loopback ports."""

    def __init__(self, repository: Path, models: list[str], ports: Ports, log_dir: Path) -> None:
        self.repository, self.models, self.ports = repository, models, ports
        self.endpoints = Endpoints(
            f"{HOST}:{ports.http}", f"{HOST}:{ports.grpc}", f"http://{HOST}:{ports.metrics}/metrics"
        )
        self.triton_log = log_dir / f"triton-{ports.http}.log"
        self.front_log = log_dir / f"http-{ports.http}.log"
        self._stack = contextlib.ExitStack()
        self.triton: TritonServer | None = None

    def __enter__(self) -> Serving:
        self.ports.check_free()
        private = free_ports()
        triton_ports = Ports(http=private.http, grpc=self.ports.grpc, metrics=private.metrics)
        try:
            self.triton = self._stack.enter_context(
                TritonServer(self.repository, self.models, triton_ports, self.triton_log)
            )
            logger = _file_logger(self.front_log)
            upstream = (private.http, private.metrics)
            self._stack.enter_context(FrontDoor(HOST, (self.ports.http, self.ports.metrics), upstream, logger))
        except BaseException:
            self._stack.close()
            raise
        return self

    def wait(self) -> None:
        """Serve until Ctrl-C / SIGTERM or until Triton stops."""
        self.triton.wait()

    def __exit__(self, *_: object) -> None:
        self._stack.close()


def _file_logger(path: Path) -> logging.Logger:
    """The front door's log (client errors at info level, one line each)."""
    logger = logging.getLogger(f"zsaq.serve.{path}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not logger.handlers:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger
