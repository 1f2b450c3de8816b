"""What ``zsaq-pipeline serve`` puts behind Triton: a repository with one Python-backend model, ``student_text``
(raw text in; tokenizer, the CPU student graph on ONNX Runtime and post-processing in one model; for a causal LM
exported with its KV cache, greedy generation: a prompt and optional ``max_new_tokens`` in, the continuation's
text and token ids out), in the configured number of instances, with Triton's dynamic batcher from the config or
else set from the validate stage's measured batch latencies (docs/ARCHITECTURE.md, Serving)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from exporters.http_front_door import FrontDoor
from exporters.triton_python_model import GenerateModel, TextModel
from exporters.triton_repo import (
    DECODING_MODULE,
    PYTHON_MODEL,
    TEXT_INPUT,
    Batching,
    TensorSpec,
    generate_io,
    generation_limits,
    graph_io,
    instance_group,
    text_outputs,
    write_config,
)
from exporters.triton_server import HOST, Ports, TritonServer, free_ports

MODEL_NAME = "student_text"
UNBATCHED_MODEL = "student_text_unbatched"  # the same model without the batcher: the load check's comparison


def instances_model(instances: int) -> str:
    """The name of the load check's twin of :data:`MODEL_NAME` with ``instances`` instances."""
    return f"{MODEL_NAME}_{instances}_instance" + ("s" if instances > 1 else "")


def twin_instances(instances: int) -> int:
    """The instance count the load check compares the served one with: 2 beside 1, 1 beside more."""
    return 2 if instances == 1 else 1


def threads_per_instance(threads: int, instances: int, cores: int | None = None) -> int:
    """ONNX Runtime intra-op threads of each instance: ``threads`` when given; else 0 (all cores) for one
    instance and ``cores // instances`` (at least 1) for more, so that the instances share the cores instead of
    each spinning a pool of all of them."""
    if threads:
        return threads
    if instances == 1:
        return 0
    return max(1, (cores or os.cpu_count() or 1) // instances)


@dataclass(frozen=True)
class ServeSpec:
    """A run's CPU student as ``serve`` serves it."""

    graph: Path
    tokenizer_dir: Path
    task_kind: str
    labels: tuple[str, ...]
    max_batch_size: int
    max_length: int
    threads: int  # ONNX Runtime intra-op threads per instance; 0: cores // instances (all cores for one)
    batching: Batching | None
    instances: int = 1
    generates: bool = False  # a causal LM's KV-cache graph: served as greedy generation

    def reference_model(self) -> TextModel | GenerateModel:
        """The served model loaded in this process, the reference the load check compares answers with. One
        ONNX Runtime thread: a thread pool here would spin beside the server's while perf_analyzer measures."""
        if self.generates:
            return GenerateModel.load(str(self.graph), str(self.tokenizer_dir), generation_limits(self.max_length), 1)
        return TextModel.load(
            str(self.graph), str(self.tokenizer_dir), self.task_kind, list(self.labels), self.max_length, 1
        )

    def describe_requests(self) -> str:
        """What one request may hold, for the console."""
        if not self.generates:
            return f"up to {self.max_batch_size} texts of {self.max_length} tokens per request"
        max_length, max_new, default_new = generation_limits(self.max_length)
        return (
            f"up to {self.max_batch_size} prompts per request, each continued greedily by max_new_tokens tokens "
            f"(1 to {max_new}, default {default_new} or what fits), prompt and continuation within {max_length}"
        )


@dataclass(frozen=True)
class Variant:
    """One model of the serve repository: the served one, or a twin the load check compares it with."""

    name: str
    role: str  # "served"; "unbatched": without the batcher; "instances": another instance count
    instances: int
    threads: int  # per instance; 0: all cores
    batching: Batching | None

    def describe(self) -> str:
        """One line for the console and the report."""
        batching = self.batching.describe() if self.batching else "no dynamic batching"
        each = f"{self.threads} ONNX Runtime thread" + ("s" if self.threads > 1 else "")
        threads = f"{each} each" if self.threads else "ONNX Runtime on all cores"
        count = f"{self.instances} instance" + ("s" if self.instances > 1 else "")
        return f"{count} ({threads}), {batching}"


def serve_variants(spec: ServeSpec, with_twins: bool = False) -> list[Variant]:
    """The served model and, for the load check (``with_twins``), the same model without the batcher and with
    the other instance count (:func:`twin_instances`)."""
    count, other = spec.instances, twin_instances(spec.instances)
    served = Variant(MODEL_NAME, "served", count, threads_per_instance(spec.threads, count), spec.batching)
    if not with_twins:
        return [served]
    return [
        served,
        Variant(UNBATCHED_MODEL, "unbatched", count, served.threads, None),
        Variant(instances_model(other), "instances", other, threads_per_instance(spec.threads, other), spec.batching),
    ]


ModelIO = tuple[list[TensorSpec], list[TensorSpec], dict[str, str]]


def _model_io(spec: ServeSpec) -> ModelIO:
    """(inputs, outputs, mode parameters) of the served model."""
    paths = {"graph": str(spec.graph.resolve()), "tokenizer": str(spec.tokenizer_dir.resolve())}
    if spec.generates:
        max_length, max_new, default_new = generation_limits(spec.max_length)
        limits = {"max_length": str(max_length), "max_new_tokens": str(max_new), "default_new_tokens": str(default_new)}
        return *generate_io(), {"mode": "generate", **paths, **limits}
    parameters = {
        "mode": "text",
        **paths,
        "task_kind": spec.task_kind,
        "labels": json.dumps(list(spec.labels)),
        "max_length": str(spec.max_length),
    }
    outputs = text_outputs(graph_io(spec.graph)[1], spec.task_kind)
    return [TensorSpec(TEXT_INPUT, "TYPE_STRING", (1,))], outputs, parameters


def _model_config(spec: ServeSpec, io: ModelIO, variant: Variant) -> dict:
    inputs, outputs, parameters = io
    parameters = {**parameters, "threads": str(variant.threads)}
    config = {
        "name": variant.name,
        "backend": "python",
        "max_batch_size": spec.max_batch_size,
        "input": [t.config() for t in inputs],
        "output": [t.config() for t in outputs],
        "instance_group": instance_group(variant.instances, "KIND_CPU"),
        "parameters": [{"key": k, "value": {"string_value": v}} for k, v in parameters.items()],
    }
    if variant.batching is not None:
        config["dynamic_batching"] = variant.batching.config()
    return config


def write_serve_repository(root: Path, spec: ServeSpec, with_twins: bool = False) -> list[Variant]:
    """The repository under ``root`` (the graph and tokenizer stay in the run folder); returns its models.
    ``with_twins`` adds the load check's comparisons (:func:`serve_variants`). A generating model gets a copy
    of :mod:`exporters.decoding` beside its ``model.py``."""
    io = _model_io(spec)
    variants = serve_variants(spec, with_twins)
    for variant in variants:
        write_config(root / variant.name, _model_config(spec, io, variant))
        shutil.copy(PYTHON_MODEL, root / variant.name / "1" / "model.py")
        if spec.generates:
            shutil.copy(DECODING_MODULE, root / variant.name / "1" / DECODING_MODULE.name)
    return variants


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
