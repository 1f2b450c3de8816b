"""The parts of ``serve`` that need no server: the batching policy, the serve section of the config, the serve
repository (instances, batcher, threads per instance), the load check's comparisons and report, the front door's
body check, the raw-text model's batch merging, and perf_analyzer's start-up errors."""

from __future__ import annotations

import gzip
import json
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calib.errors import StageUnavailable
from exporters import perf_analyzer
from exporters.http_front_door import body_error
from exporters.serve_check import batching_effect, instances_effect
from exporters.triton_python_model import InvalidRequest, TextModel
from exporters.triton_repo import Batching, batching_policy
from exporters.triton_serve import ServeSpec, serve_variants, threads_per_instance, write_serve_repository
from pipeline.report import plot_serve_load, render_serve_markdown
from pipeline.serving import served_spec
from tests.models import minilm_tokenizer


def latencies(*rows: tuple[int, float, float]) -> list[dict]:
    return [{"batch": b, "p50_ms": p50, "throughput": tput} for b, p50, tput in rows]


def test_batching_waits_only_where_a_bigger_batch_computes_more_per_second():
    # a CPU where batch 8 is no faster per item (the MiniLM main job at 128 tokens): merge what queued, never wait
    assert batching_policy(latencies((1, 20.5, 48.8), (8, 166.6, 48.0)), 8) == Batching((), 0)
    # batching pays (a GPU engine): prefer the sizes that pay, wait a tenth of batch 1's latency
    assert batching_policy(latencies((1, 4.0, 250.0), (4, 6.0, 660.0), (8, 9.0, 880.0)), 8) == Batching((4, 8), 400)
    assert batching_policy(latencies((1, 80.0, 12.5), (8, 90.0, 88.0)), 8) == Batching((8,), 5000)  # capped at 5 ms
    # sizes over the served maximum are ignored; no measurements: no preferred sizes and no delay
    assert batching_policy(latencies((1, 4.0, 250.0), (16, 9.0, 1700.0)), 8) == Batching((), 0)
    assert batching_policy([], 8) == Batching((), 0)
    assert Batching((4, 8), 400).config() == {"max_queue_delay_microseconds": 400, "preferred_batch_size": [4, 8]}


def causal_graph(path: Path, vocab: int) -> Path:
    """logits[b, s, v] = how often token v occurred in positions 0..s (masked): a causal function of the ids."""
    nodes = [
        helper.make_node("Constant", [], ["vocab"], value=helper.make_tensor("v", TensorProto.INT64, [], [vocab])),
        helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("a", TensorProto.INT64, [], [1])),
        helper.make_node("Constant", [], ["values"], value=helper.make_tensor("o", TensorProto.FLOAT, [2], [0, 1])),
        helper.make_node("Mod", ["input_ids", "vocab"], ["token"]),
        helper.make_node("OneHot", ["token", "vocab", "values"], ["onehot"], axis=-1),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "axes"], ["mask3"]),
        helper.make_node("Mul", ["onehot", "mask3"], ["masked"]),
        helper.make_node("CumSum", ["masked", "axis"], ["logits"]),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in ("input_ids", "attention_mask")]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])
    graph = helper.make_graph(nodes, "causal", inputs, [output], initializer=[axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_merged_requests_get_what_each_gets_alone(tmp_path):
    """Requests merged by the batcher are padded to the longest of all; each answer is cut back to its own length
    and equals the answer it gets alone (right padding keeps every token at its position)."""
    tokenizer_dir = tmp_path / "tokenizer"
    minilm_tokenizer().save_pretrained(str(tokenizer_dir))
    graph = causal_graph(tmp_path / "causal.onnx", 7)
    model = TextModel.load(str(graph), str(tokenizer_dir), "causal-lm", [], 32, 1)
    requests = [["a cat"], ["two small dogs run far away", "hi"], ["the end"]]
    alone = [model(texts)["logits"] for texts in requests]
    checked = [model.check(np.array([[t.encode()] for t in texts], dtype=object)) for texts in requests]
    merged = [out["logits"] for out in model.run(checked)]
    for single, together, (_, length) in zip(alone, merged, checked):
        assert together.shape == single.shape and together.shape[1] == length
        np.testing.assert_array_equal(together, single)
    assert merged[0].shape[1] < merged[1].shape[1]  # not padded to the merged batch's length
    with pytest.raises(InvalidRequest, match="text 1 is empty") as refused:
        model.check(np.array([[b"fine"], [b" "]], dtype=object))
    assert refused.value.reason == "empty_text"


def parse_repository(root: Path, names: list[str]) -> dict:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the [serve] extra")
    from google.protobuf import text_format

    configs = {}
    for name in names:
        text = (root / name / "config.pbtxt").read_text()
        configs[name] = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert configs[name].name == name and (root / name / "1" / "model.py").is_file()
    return configs


def test_serve_repository_has_the_batched_model_and_its_twins(tmp_path):
    graph = causal_graph(tmp_path / "causal.onnx", 7)
    spec = ServeSpec(graph, tmp_path / "tok", "causal-lm", (), 4, 32, 2, Batching((4,), 300))
    variants = write_serve_repository(tmp_path / "repo", spec, with_twins=True)
    models = [v.name for v in variants]
    assert models == ["student_text", "student_text_unbatched", "student_text_2_instances"]
    assert [v.role for v in variants] == ["served", "unbatched", "instances"]
    configs = parse_repository(tmp_path / "repo", models)
    batched, unbatched, twin = (configs[name] for name in models)
    assert batched.backend == "python" and batched.max_batch_size == 4
    assert list(batched.dynamic_batching.preferred_batch_size) == [4]
    assert batched.dynamic_batching.max_queue_delay_microseconds == 300
    assert not unbatched.HasField("dynamic_batching")
    assert twin.dynamic_batching == batched.dynamic_batching
    assert [g.count for g in batched.instance_group] == [1] and [g.count for g in twin.instance_group] == [2]
    assert [(t.name, list(t.dims)) for t in batched.output] == [("logits", [-1, 7])]
    params = {k: v.string_value for k, v in batched.parameters.items()}
    assert params["mode"] == "text" and params["graph"] == str(graph.resolve()) and params["threads"] == "2"
    assert twin.parameters["threads"].string_value == "2"  # --threads is per instance, whatever the count
    assert json.loads(params["labels"]) == []
    assert write_serve_repository(tmp_path / "alone", spec) == variants[:1]  # serving: the model alone


def test_instances_share_the_cores_unless_threads_are_given(tmp_path, monkeypatch):
    assert threads_per_instance(0, 1, cores=2) == 0  # one instance: ONNX Runtime's own (all cores)
    assert threads_per_instance(0, 2, cores=2) == 1 and threads_per_instance(0, 3, cores=16) == 5
    assert threads_per_instance(0, 4, cores=2) == 1  # at least one
    assert threads_per_instance(3, 2, cores=2) == 3  # --threads wins
    monkeypatch.setattr("exporters.triton_serve.os.cpu_count", lambda: 8)
    graph = causal_graph(tmp_path / "causal.onnx", 7)
    spec = ServeSpec(graph, tmp_path / "tok", "causal-lm", (), 8, 32, 0, Batching((), 0), instances=2)
    variants = write_serve_repository(tmp_path / "repo", spec, with_twins=True)
    assert [(v.name, v.instances, v.threads) for v in variants] == [
        ("student_text", 2, 4),
        ("student_text_unbatched", 2, 4),
        ("student_text_1_instance", 1, 0),
    ]
    configs = parse_repository(tmp_path / "repo", [v.name for v in variants])
    cpu = pytest.importorskip("tritonclient.grpc.model_config_pb2").ModelInstanceGroup.KIND_CPU
    for variant in variants:
        config = configs[variant.name]
        assert [(g.count, g.kind) for g in config.instance_group] == [(variant.instances, cpu)]
        assert config.parameters["threads"].string_value == str(variant.threads)


def fake_run(tmp_path: Path, serve: dict | None, shapes=((1, 128), (8, 128)), latencies_rows=()) -> Path:
    """A run folder with what ``serve`` reads: the manifest's config, the CPU student graph, a tokenizer and
    the validate report's latencies of the CPU student."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    causal_graph(run / "export" / "student_qdq_cpu.onnx", 7)
    minilm_tokenizer().save_pretrained(str(run / "teacher" / "model"))
    config = {"task": {"kind": "causal-lm", "num_labels": 2}, "validate": {"shapes": [list(s) for s in shapes]}}
    if serve is not None:
        config["serve"] = serve
    (run / "manifest.json").write_text(json.dumps({"config": config}))
    (run / "validate").mkdir()
    report = {"models": [{"name": "qdq-cpu-flavour", "latency": latencies(*latencies_rows)}]}
    (run / "validate" / "report.json").write_text(json.dumps(report))
    return run


def test_served_spec_takes_the_config_serve_section_over_the_measured_policy(tmp_path):
    measured = ((1, 4.0, 250.0), (8, 9.0, 880.0))
    older = served_spec(fake_run(tmp_path / "a", None, latencies_rows=measured), 0, True)  # before serve existed
    assert older.instances == 1 and older.batching == Batching((8,), 400)
    given = {"instances": 2, "dynamic_batching": {"preferred_batch_sizes": [2, 4], "max_queue_delay_us": 150}}
    run = fake_run(tmp_path / "b", given, latencies_rows=measured)
    spec = served_spec(run, 0, True)
    assert spec.instances == 2 and spec.batching == Batching((2, 4), 150) and spec.max_batch_size == 8
    assert served_spec(run, 0, True, instances=3).instances == 3  # serve --instances
    assert served_spec(run, 0, False).batching is None  # --no-batching
    just_instances = served_spec(fake_run(tmp_path / "c", {"instances": 2}, latencies_rows=measured), 0, True)
    assert just_instances.instances == 2 and just_instances.batching == Batching((8,), 400)


def level(model: str, role: str, instances: int, concurrency: int, throughput: float, p99: float, **kw) -> dict:
    row = {"protocol": "http", "model": model, "role": role, "instances": instances, "threads": 0}
    row |= {"concurrency": concurrency, "completed": True, "error": None, "throughput": throughput}
    row |= {"p50_ms": p99 / 2, "p99_ms": p99, "queue_ms": 0.1, "compute_ms": 1.0, "server_failures": 0}
    row["batching"] = role != "unbatched"
    return {**row, **kw}


def test_the_load_check_compares_batching_and_instance_counts_at_each_concurrency(tmp_path):
    levels = [
        level("student_text", "served", 2, 1, 200.0, 9.0),
        level("student_text", "served", 2, 4, 500.0, 20.0),
        level("student_text_unbatched", "unbatched", 2, 1, 210.0, 8.0),
        level("student_text_unbatched", "unbatched", 2, 4, 250.0, 30.0),
        level("student_text_1_instance", "instances", 1, 1, 190.0, 10.0),
        level("student_text_1_instance", "instances", 1, 4, 400.0, 25.0),
        level("student_text", "served", 2, 4, 600.0, 15.0, protocol="grpc"),
    ]
    assert batching_effect(levels) == {
        "concurrency": 4,
        "throughput_ratio": 2.0,
        "p99_batched_ms": 20.0,
        "p99_unbatched_ms": 30.0,
    }
    effect = instances_effect(levels)
    assert effect["instances"] == [1, 2] and [row["concurrency"] for row in effect["levels"]] == [1, 4]
    assert effect["levels"][1] == {
        "concurrency": 4,
        "throughput": {"1": 400.0, "2": 500.0},
        "p99_ms": {"1": 25.0, "2": 20.0},
        "throughput_ratio": 1.25,
    }
    failed = [
        lv if lv["role"] != "instances" or lv["concurrency"] == 1 else {**lv, "completed": False} for lv in levels
    ]
    assert [row["concurrency"] for row in instances_effect(failed)["levels"]] == [1]
    assert instances_effect([lv for lv in levels if lv["role"] != "instances"]) is None

    spec = ServeSpec(Path("g.onnx"), Path("tok"), "causal-lm", (), 8, 32, 1, Batching((2,), 100), instances=2)
    variants = [{"name": v.name, "role": v.role, "described": v.describe()} for v in serve_variants(spec, True)]
    report = {
        "model": "student_text",
        "graph": "g.onnx",
        "server": "Triton",
        "perf_analyzer": "pa",
        "machine": "cpu",
        "endpoints": {"http": "h", "grpc": "g", "metrics": "m"},
        "variants": variants,
        "max_batch_size": 8,
        "answers": {"http_max_abs_diff": 0.0, "grpc_max_abs_diff": 0.0},
        "passed": True,
        "windows": {"window_ms": 500, "stability_percent": 100.0, "trials": 6},
        "levels": levels,
        "batching_effect": batching_effect(levels),
        "instances_effect": effect,
        "malformed": {"cases": [], "served_after": True, "counters": {}},
    }
    markdown = render_serve_markdown(report)
    assert "## Instances: 1 vs 2 (HTTP" in markdown
    assert "| 4 | 400.0 | 25.0 | 500.0 | 20.0 | 1.25x |" in markdown
    assert "| http | student_text_1_instance | 1 | 4 | 400.0 |" in markdown
    assert (
        "- `student_text` (served): 2 instances (1 ONNX Runtime thread each), dynamic batching: preferred batch "
        "sizes 2, queue delay 100 us" in markdown
    )
    unbatched = "- `student_text_unbatched` (the same without the batcher): 2 instances (1 ONNX Runtime thread each)"
    assert f"{unbatched}, no dynamic batching" in markdown
    plot_serve_load(report, tmp_path / "load.png")
    assert (tmp_path / "load.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("body", "headers", "reason"),
    [
        (b'{"inputs": [', {}, "the request body is not valid JSON (Expecting value"),
        (b"[1, 2]", {}, "the request body is JSON but not an object (a list)"),
        (b"", {}, "the request body is not valid JSON"),
        (b"\xff\xfe", {}, "the request body is not valid JSON"),
        (b'{"inputs": []}xx', {"Inference-Header-Content-Length": "99"}, "outside the body's 16 bytes"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "x"}, "not valid JSON (invalid literal"),
        (b"not gzip", {"Content-Encoding": "gzip"}, "the request body is not valid gzip data"),
    ],
)
def test_front_door_names_what_is_wrong_with_a_body(body, headers, reason):
    assert reason in body_error(body, headers)


def test_front_door_passes_json_binary_and_compressed_requests():
    assert body_error(b'{"inputs": []}', {}) is None
    assert body_error(b'{"inputs": []}\x02\x00\x00\x00hi', {"Inference-Header-Content-Length": "14"}) is None
    assert body_error(gzip.compress(b'{"inputs": []}'), {"Content-Encoding": "gzip"}) is None


def test_perf_analyzer_without_its_libraries_is_a_one_line_error(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "perf_analyzer"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\necho 'perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot open shared "
        "object file: No such file or directory' >&2\nexit 127\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(perf_analyzer.sys, "executable", str(fake.parent / "python"))
    perf_analyzer.perf_analyzer.cache_clear()
    try:
        with pytest.raises(StageUnavailable) as info:
            perf_analyzer.perf_analyzer()
    finally:
        perf_analyzer.perf_analyzer.cache_clear()
    assert str(info.value) == "perf_analyzer cannot start: libb64.so.0d is missing (apt-get install libb64-0d)"
