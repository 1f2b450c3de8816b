"""The parts of ``serve`` that need no server: the batching policy, the serve repository, the front door's body
check, the raw-text model's batch merging, and perf_analyzer's start-up errors."""

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
from exporters.triton_python_model import InvalidRequest, TextModel
from exporters.triton_serve import Batching, ServeSpec, batching_policy, write_serve_repository
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


def test_serve_repository_has_the_batched_model_and_its_unbatched_twin(tmp_path):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the [serve] extra")
    from google.protobuf import text_format

    graph = causal_graph(tmp_path / "causal.onnx", 7)
    spec = ServeSpec(graph, tmp_path / "tok", "causal-lm", (), 4, 32, 2, Batching((4,), 300))
    models = write_serve_repository(tmp_path / "repo", spec, with_unbatched=True)
    assert models == ["student_text", "student_text_unbatched"]
    configs = {}
    for name in models:
        text = (tmp_path / "repo" / name / "config.pbtxt").read_text()
        configs[name] = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert (tmp_path / "repo" / name / "1" / "model.py").is_file()
    batched, unbatched = configs["student_text"], configs["student_text_unbatched"]
    assert batched.backend == "python" and batched.max_batch_size == 4
    assert list(batched.dynamic_batching.preferred_batch_size) == [4]
    assert batched.dynamic_batching.max_queue_delay_microseconds == 300
    assert not unbatched.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in batched.output] == [("logits", [-1, 7])]
    params = {k: v.string_value for k, v in batched.parameters.items()}
    assert params["mode"] == "text" and params["graph"] == str(graph.resolve()) and params["threads"] == "2"
    assert json.loads(params["labels"]) == []


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
