"""What ``serve`` serves, found through the run layout: the CPU student graph (a causal LM's with its KV cache:
served as generation), the tokenizer, the task's labels, the limits the graph was validated at, and the run
config's ``serve`` section (instances, and the dynamic batcher, which without ``serve.dynamic_batching`` is the
one the validated latencies suggest)."""

from __future__ import annotations

import json
from pathlib import Path

from calib.errors import PipelineError
from exporters.config import ServeConfig
from exporters.triton_repo import Batching, configured_batching, has_kv_cache, label_names, serving_limits
from exporters.triton_serve import ServeSpec
from pipeline.config import build
from pipeline.layout import MANIFEST, REPORT_JSON, STUDENT_ONNX, TEACHER_MODEL
from pipeline.stages.validate import student_label


def validated_latencies(run_dir: Path) -> list[dict]:
    """The validate stage's batch latencies of the CPU student graph ([] when it has none)."""
    path = REPORT_JSON.path(run_dir)
    if not path.is_file():
        return []
    models = json.loads(path.read_text(encoding="utf-8")).get("models", [])
    return next((m.get("latency", []) for m in models if m.get("name") == student_label("cpu")), [])


def served_spec(run_dir: Path, threads: int, batching: bool, instances: int | None = None) -> ServeSpec:
    """The run's CPU student as ``serve`` serves it (``instances``: the command line's, over the config's);
    one-line errors for what is missing."""
    if not (run_dir / MANIFEST).is_file():
        raise PipelineError(f"{run_dir}: no {MANIFEST} here (not a run folder)")
    graph = STUDENT_ONNX["cpu"]
    if not graph.path(run_dir).is_file():
        raise PipelineError(
            f"{run_dir}: no CPU student graph {graph.stage}/{graph.name}; run the pipeline into it first"
        )
    model_dir = TEACHER_MODEL.path(run_dir)
    if not (model_dir / "tokenizer_config.json").is_file():
        raise PipelineError(f"{model_dir}: the model has no tokenizer, and serve takes raw text")
    config = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))["config"]
    task = config["task"]
    max_batch, max_length = serving_limits(config["validate"]["shapes"])
    labels = label_names(model_dir, task["num_labels"]) if task["kind"] == "classification" else ()
    # runs made before the serve section have none: its defaults
    serve = build(ServeConfig, config.get("serve") or {}, str(run_dir / MANIFEST), "serve")
    policy: Batching | None = None
    if batching:
        policy = configured_batching(serve, validated_latencies(run_dir), max_batch)
    generates = task["kind"] == "causal-lm" and has_kv_cache(graph.path(run_dir))
    return ServeSpec(
        graph.path(run_dir), model_dir, task["kind"], labels, max_batch, max_length, threads, policy,
        instances or serve.instances, generates,
    )  # fmt: skip
