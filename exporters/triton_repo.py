"""Triton model repository: ``config.pbtxt`` files derived from the ONNX graph (written by a small protobuf
text writer: packaging needs no serve extra; the tests parse them with Triton's ``ModelConfig``). A causal LM
exported with its KV cache is served as generation (:data:`GENERATE_MODEL`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from calib.errors import PipelineError
from exporters.config import ServeConfig
from exporters.decoding import past_name
from exporters.triton_python_model import GENERATED_IDS, GENERATED_TEXT, NEW_TOKENS_INPUT, TEXT_INPUT

PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
DECODING_MODULE = Path(__file__).with_name("decoding.py")  # a generating model.py imports its copy
DEFAULT_NEW_TOKENS = 32  # what a generation request without max_new_tokens gets (at most the limit)
ONNX_TO_TRITON = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
BATCHING_PAYS = 1.2  # a batch size is preferred when it computes this many times batch 1's items per second
QUEUE_DELAY_SHARE = 0.1  # then a lone request waits at most this share of its own batch-1 latency for company
MAX_QUEUE_DELAY_US = 5000

# Model names in the repository; the ensembles take raw text.
ONNX_MODEL, PLAN_MODEL = "student_onnx", "student_trt"
TOKENIZER_MODEL, POSTPROCESS_MODEL = "tokenizer", "postprocess"
TEXT_ENSEMBLE = {ONNX_MODEL: "student_text", PLAN_MODEL: "student_text_trt"}
GENERATE_MODEL = "student_generate"  # a causal LM's KV-cache graph: greedy generation, raw text in and out


class Enum(str):
    """A protobuf enum value: written bare (``TYPE_FP32``), not quoted."""


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum | int | float):
        return str(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a message given as a dict (lists are repeated fields, dicts sub-messages)."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(item, dict) for item in items):
            for item in items:
                lines += [f"{pad}{key} {{", to_pbtxt(item, indent + 1).rstrip("\n"), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(item) for item in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line) + "\n"


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


def configured_batching(serve: ServeConfig, latencies: Sequence[dict[str, Any]], max_batch_size: int) -> Batching:
    """The config's ``serve.dynamic_batching`` when given, else :func:`batching_policy` of the measured latencies."""
    given = serve.dynamic_batching
    if given is None:
        return batching_policy(latencies, max_batch_size)
    return Batching(tuple(given.preferred_batch_sizes), given.max_queue_delay_us)


def instance_group(count: int, kind: str) -> list[dict[str, Any]]:
    """The ``instance_group`` field: ``count`` copies of the model of ``kind`` (KIND_CPU, KIND_GPU)."""
    return [{"count": count, "kind": Enum(kind)}]


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton declares it: the batch axis left out, -1 for dynamic axes."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False  # an input a request may leave out

    def config(self) -> dict[str, Any]:
        """The ``ModelInput`` / ``ModelOutput`` message."""
        message = {"name": self.name, "data_type": Enum(self.data_type), "dims": list(self.dims)}
        return {**message, "optional": True} if self.optional else message


def _tensor_spec(value: onnx.ValueInfoProto, path: Path) -> TensorSpec:
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not dims or dims[0] != -1:
        raise PipelineError(f"package: {path.name}: '{value.name}' has no dynamic batch axis; Triton cannot batch it")
    if tensor.elem_type not in ONNX_TO_TRITON:
        raise PipelineError(f"package: {path.name}: '{value.name}' has an element type Triton configs do not map")
    return TensorSpec(value.name, ONNX_TO_TRITON[tensor.elem_type], tuple(dims[1:]))


def graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an ONNX graph, without loading its weights."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [_tensor_spec(v, path) for v in graph.input if v.name not in initializers]
    return inputs, [_tensor_spec(v, path) for v in graph.output]


def model_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch_size: int,
    kind: str,
    serving: tuple[int, Batching] = (1, Batching((), 0)),
    **fields: Any,
) -> dict[str, Any]:
    """A batched model: ``serving`` is (instances of ``kind`` (KIND_CPU, KIND_GPU), its dynamic batcher)."""
    instances, batching = serving
    return {
        "name": name,
        **fields,
        "max_batch_size": max_batch_size,
        "input": [t.config() for t in inputs],
        "output": [t.config() for t in outputs],
        "instance_group": instance_group(instances, kind),
        "dynamic_batching": batching.config(),
    }


def _parameters(values: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": key, "value": {"string_value": value}} for key, value in values.items()]


def _ensemble_step(model: str, inputs: list[str], outputs: list[str]) -> dict[str, Any]:
    return {
        "model_name": model,
        "model_version": -1,
        "input_map": [{"key": name, "value": name} for name in inputs],
        "output_map": [{"key": name, "value": name} for name in outputs],
    }


def text_outputs(graph_outputs: list[TensorSpec], task_kind: str) -> list[TensorSpec]:
    """What a raw-text model answers: the graph's output, or for classification the label and softmax scores."""
    if task_kind != "classification":
        return graph_outputs
    (logits,) = graph_outputs
    return [TensorSpec("label", "TYPE_STRING", (1,)), TensorSpec("scores", "TYPE_FP32", logits.dims)]


def has_kv_cache(path: Path) -> bool:
    """Whether a graph takes a KV cache (a causal LM exported for generation, :mod:`exporters.decoding`)."""
    return any(t.name == past_name(0, "key") for t in graph_io(path)[0])


def generate_io() -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A generating model's (inputs, outputs): the prompt and optional ``max_new_tokens`` per text; the
    continuation's text and token ids (-1 after its end)."""
    inputs = [TensorSpec(TEXT_INPUT, "TYPE_STRING", (1,)), TensorSpec(NEW_TOKENS_INPUT, "TYPE_INT32", (1,), True)]
    return inputs, [TensorSpec(GENERATED_TEXT, "TYPE_STRING", (1,)), TensorSpec(GENERATED_IDS, "TYPE_INT64", (-1,))]


def generation_limits(max_length: int) -> tuple[int, int, int]:
    """(max tokens of prompt and continuation together, the most new tokens a request may ask for, what it gets
    without asking) for a graph validated at ``max_length`` tokens; a one-line error when that leaves no room."""
    if max_length < 2:
        raise PipelineError(f"a decoder validated at {max_length} token(s) has no room for a prompt and a new token")
    return max_length, max_length - 1, min(DEFAULT_NEW_TOKENS, max_length - 1)


def serving_limits(shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(max batch size, max tokens per text): the largest validated shape, which the TensorRT profile also uses."""
    return max(b for b, _ in shapes), max(s for _, s in shapes)


def label_names(model_dir: Path, count: int) -> tuple[str, ...]:
    """Class names from the model's ``id2label`` when it names all ``count`` classes, else LABEL_0, LABEL_1 ..."""
    id2label = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
    if len(id2label) != count:
        return tuple(f"LABEL_{i}" for i in range(count))
    return tuple(id2label[str(i)] for i in range(count))


@dataclass(frozen=True)
class RepositorySpec:
    """What goes into the repository: the graphs, the tokenizer folder and what the text models need."""

    onnx_path: Path
    plan: tuple[Path, Path] | None  # (engine, the ONNX graph it was built from)
    tokenizer: Any  # a transformers tokenizer, or None when the model has none
    task_kind: str
    labels: tuple[str, ...]
    max_batch_size: int
    max_length: int
    instances: int = 1  # of each model but the ensembles (which Triton runs without instances)
    batching: Batching = Batching((), 0)

    @property
    def serving(self) -> tuple[int, Batching]:
        """(instances, batcher) of every model that computes."""
        return self.instances, self.batching


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """``folder/config.pbtxt`` and the version folder ``folder/1``."""
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(to_pbtxt(config), encoding="utf-8")


def _write_text_models(root: Path, spec: RepositorySpec, outputs: list[TensorSpec]) -> tuple[list[dict], list]:
    """The tokenizer and, for classification, post-processing models; returns (steps after the graph, outputs)."""
    ids = [TensorSpec(name, "TYPE_INT64", (-1,)) for name in ("input_ids", "attention_mask")]
    text = [TensorSpec(TEXT_INPUT, "TYPE_STRING", (1,))]
    folder = root / TOKENIZER_MODEL
    config = model_config(TOKENIZER_MODEL, text, ids, spec.max_batch_size, "KIND_CPU", spec.serving, backend="python")
    params = {"mode": "tokenize", "max_length": str(spec.max_length)}
    write_config(folder, {**config, "parameters": _parameters(params)})
    spec.tokenizer.save_pretrained(str(folder / "1" / "tokenizer"))
    shutil.copy(PYTHON_MODEL, folder / "1" / "model.py")
    if spec.task_kind != "classification":
        return [], outputs
    (logits,) = outputs
    final = text_outputs(outputs, spec.task_kind)
    folder = root / POSTPROCESS_MODEL
    config = model_config(
        POSTPROCESS_MODEL, [logits], final, spec.max_batch_size, "KIND_CPU", spec.serving, backend="python"
    )
    params = {"mode": "classify", "labels": json.dumps(list(spec.labels))}
    write_config(folder, {**config, "parameters": _parameters(params)})
    shutil.copy(PYTHON_MODEL, folder / "1" / "model.py")
    return [_ensemble_step(POSTPROCESS_MODEL, [logits.name], [t.name for t in final])], final


def ensemble_config(
    name: str, graph_model: str, graph: tuple[list, list], after: list[dict], outputs: list, batch: int
):
    """Raw text in: tokenizer, then the graph, then the steps ``after`` it; ``outputs`` are the ensemble's."""
    inputs, graph_outputs = graph
    steps = [
        _ensemble_step(TOKENIZER_MODEL, [TEXT_INPUT], [t.name for t in inputs]),
        _ensemble_step(graph_model, [t.name for t in inputs], [t.name for t in graph_outputs]),
        *after,
    ]
    return {
        "name": name,
        "platform": "ensemble",
        "max_batch_size": batch,
        "input": [TensorSpec(TEXT_INPUT, "TYPE_STRING", (1,)).config()],
        "output": [t.config() for t in outputs],
        "ensemble_scheduling": {"step": steps},
    }


def _write_generate_model(root: Path, spec: RepositorySpec) -> None:
    """The Python-backend model that generates with the CPU graph (ONNX Runtime on all cores). Its version folder
    holds all it needs (a copy of the graph, the tokenizer, :mod:`exporters.decoding`'s file): a server with the
    Python backend alone serves it."""
    folder = root / GENERATE_MODEL
    config = model_config(
        GENERATE_MODEL, *generate_io(), spec.max_batch_size, "KIND_CPU", spec.serving, backend="python"
    )
    max_length, max_new, default_new = generation_limits(spec.max_length)
    params = {
        "mode": "generate",
        "graph": "model.onnx",  # relative to the version folder
        "tokenizer": "tokenizer",
        "max_length": str(max_length),
        "max_new_tokens": str(max_new),
        "default_new_tokens": str(default_new),
        "threads": "0",
    }
    write_config(folder, {**config, "parameters": _parameters(params)})
    shutil.copy(spec.onnx_path, folder / "1" / "model.onnx")
    spec.tokenizer.save_pretrained(str(folder / "1" / "tokenizer"))
    shutil.copy(PYTHON_MODEL, folder / "1" / "model.py")
    shutil.copy(DECODING_MODULE, folder / "1" / DECODING_MODULE.name)


def write_repository(root: Path, spec: RepositorySpec) -> dict[str, Any]:
    """Write the repository under ``root``; returns {"models": {name: platform or backend}, ...}. A causal LM
    exported with its KV cache gets :data:`GENERATE_MODEL` instead of the text ensembles (an ensemble cannot
    feed a graph its cache)."""
    graphs = {ONNX_MODEL: graph_io(spec.onnx_path)}
    config = model_config(
        ONNX_MODEL, *graphs[ONNX_MODEL], spec.max_batch_size, "KIND_CPU", spec.serving, platform="onnxruntime_onnx"
    )
    write_config(root / ONNX_MODEL, config)
    shutil.copy(spec.onnx_path, root / ONNX_MODEL / "1" / "model.onnx")
    models = {ONNX_MODEL: "onnxruntime_onnx"}
    if spec.plan is not None:
        engine, source = spec.plan
        graphs[PLAN_MODEL] = graph_io(source)
        config = model_config(
            PLAN_MODEL, *graphs[PLAN_MODEL], spec.max_batch_size, "KIND_GPU", spec.serving, platform="tensorrt_plan"
        )
        write_config(root / PLAN_MODEL, config)
        shutil.copy(engine, root / PLAN_MODEL / "1" / "model.plan")
        models[PLAN_MODEL] = "tensorrt_plan"
    summary: dict[str, Any] = {
        "models": models,
        "max_batch_size": spec.max_batch_size,
        "instances": spec.instances,
        "batching": spec.batching.describe(),
    }
    if spec.tokenizer is None:
        summary["note"] = "the model has no tokenizer: no tokenizer model and no text ensemble (send token ids)"
        return summary
    if has_kv_cache(spec.onnx_path):
        _write_generate_model(root, spec)
        models[GENERATE_MODEL] = "python"
        return {**summary, "max_length": spec.max_length}
    after, outputs = _write_text_models(root, spec, graphs[ONNX_MODEL][1])
    models[TOKENIZER_MODEL] = "python"
    if after:
        models[POSTPROCESS_MODEL] = "python"
    for graph_model, graph in graphs.items():
        name = TEXT_ENSEMBLE[graph_model]
        write_config(root / name, ensemble_config(name, graph_model, graph, after, outputs, spec.max_batch_size))
        models[name] = "ensemble"
    return {**summary, "max_length": spec.max_length}
