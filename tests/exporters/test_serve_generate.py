"""A causal-LM run served: the Python-backend model's ``generate`` mode (greedy decoding of the cached CPU graph),
its refusals, the repositories of ``serve`` and of the package stage, and, against a real Triton server, the
package's generating model and ``serve --load-check``."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from calib.errors import PipelineError
from calib.models import load_saved_tokenizer
from exporters import decoding, triton_python_model
from exporters.perf_analyzer import write_input_data
from exporters.serve_check import (
    LOAD_NEW_TOKENS,
    LOAD_TEXTS,
    generation_malformed,
    load_extra,
    load_inputs,
    malformed_cases,
)
from exporters.triton_python_model import ENDED, GenerateModel, InvalidRequest, kept_tokens
from exporters.triton_repo import RepositorySpec, generation_limits, write_repository
from exporters.triton_serve import write_serve_repository
from pipeline.serving import served_spec
from tests.models import save_tiny_llama_folder

MAX_LENGTH = 24
PROMPTS = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11 w12 w13", "w40 w41"]


@pytest.fixture(scope="module")
def generating_run(tmp_path_factory) -> Path:
    """A finished run of a tiny random Llama with a word-level tokenizer, validated at 24 tokens."""
    from click.testing import CliRunner

    from pipeline.cli import main

    root = tmp_path_factory.mktemp("generating")
    save_tiny_llama_folder(root / "model")
    config = {
        "model": {"path": str(root / "model")},
        "task": {"kind": "causal-lm"},
        "calib": {"method": "random-tokens", "samples": 8, "seq_len": 16, "batch_size": 8},
        "validate": {
            "shapes": [[1, MAX_LENGTH], [4, MAX_LENGTH]],
            "repeats": 2,
            "warmup": 1,
            "samples": 8,
            "decoder": {"prompts": 2, "new_tokens": 4, "cache_windows": 1, "past": 16, "batches": [1], "repeats": 2},
        },
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(main, ["run", str(root / "config.yaml"), "--out", str(root / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def model(generating_run) -> GenerateModel:
    """The served model in-process, as the load check loads it."""
    spec = served_spec(generating_run, 1, True)
    assert spec.generates
    return spec.reference_model()


def texts(*values: str | bytes) -> np.ndarray:
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=np.object_)


def new_tokens(*values: int) -> np.ndarray:
    return np.array([[v] for v in values], dtype=np.int32)


def test_generation_limits_leave_room_for_the_prompt():
    assert generation_limits(24) == (24, 23, 23)
    assert generation_limits(256) == (256, 255, 32)
    with pytest.raises(PipelineError, match="a decoder validated at 1 token"):
        generation_limits(1)


def test_answers_equal_greedy_decoding_of_the_graph_for_each_prompt_alone(model, generating_run):
    """One request of four prompts, each with its own max_new_tokens: each row is the graph's greedy continuation
    of that prompt decoded alone (exporters.decoding.generate), cut to its max_new_tokens."""
    stepper = decoding.OrtStepper(generating_run / "export" / "student_qdq_cpu.onnx", 1)
    asked = [6, 3, 5, 1]
    answer = model.answer({"text": texts(*PROMPTS), "max_new_tokens": new_tokens(*asked)})
    ids, generated = answer["generated_ids"], answer["generated_text"]
    assert ids.dtype == np.int64 and ids.shape == (4, 6) and generated.shape == (4, 1)
    for row, (prompt, count) in enumerate(zip(PROMPTS, asked)):
        prompt_ids = model.tokenizer(prompt)["input_ids"]
        alone = [int(t[0]) for t in decoding.generate(stepper, [prompt_ids], count, 0, model.tokenizer.eos_token_id)]
        assert ids[row].tolist() == alone + [ENDED] * (6 - count)
        assert generated[row, 0].decode() == model.tokenizer.decode(alone, skip_special_tokens=True)
    merged = model.run([model.check(texts(p), new_tokens(n)) for p, n in zip(PROMPTS, asked)])
    for row, single in enumerate(merged):  # requests merged by the batcher: each gets what it gets alone
        assert single["generated_ids"].tolist() == [ids[row, : asked[row]].tolist()]


def test_without_max_new_tokens_a_prompt_gets_the_default_or_what_fits(model):
    assert model.default_new_tokens == MAX_LENGTH - 1  # min(32, the most a request may ask for)
    assert model.check(texts("w1")).new_tokens == [MAX_LENGTH - 1]
    assert model.answer({"text": texts("w1 w2")})["generated_ids"].shape == (1, MAX_LENGTH - 2)
    crowded = " ".join(f"w{i}" for i in range(MAX_LENGTH - 3))
    assert model.check(texts(crowded, "w1")).new_tokens == [3, MAX_LENGTH - 1]  # the room each prompt leaves


def test_generation_ends_at_the_end_of_sequence_token(model):
    """A row whose greedy continuation reaches the end-of-sequence token stops there (the token kept in the ids,
    -1 after it, skipped in the text); the other rows of the request go on."""
    asked = new_tokens(6, 6)
    plain = model.answer({"text": texts(PROMPTS[0], PROMPTS[1]), "max_new_tokens": asked})["generated_ids"]
    first, second = plain.tolist()
    eos = next(t for t in first[1:4] if t not in second and t < len(model.tokenizer) and t != first[0])
    stop = first.index(eos)
    original = model.tokenizer.eos_token
    model.tokenizer.eos_token = model.tokenizer.convert_ids_to_tokens(eos)
    try:
        answer = model.answer({"text": texts(PROMPTS[0], PROMPTS[1]), "max_new_tokens": asked})
    finally:
        model.tokenizer.eos_token = original
    assert answer["generated_ids"].tolist() == [first[: stop + 1] + [ENDED] * (5 - stop), second]
    assert answer["generated_text"][0, 0].decode() == model.tokenizer.decode(first[:stop], skip_special_tokens=True)
    assert kept_tokens(np.array([4, 5, 9, 5]), 3, eos_id=9) == [4, 5, 9]
    assert kept_tokens(np.array([4, 5, 9, 5]), 2, eos_id=9) == [4, 5]
    assert kept_tokens(np.array([4, 5]), 4, eos_id=None) == [4, 5]


@pytest.mark.parametrize(
    ("text", "asked", "message", "reason"),
    [
        (texts(""), None, "text 0 is empty", "empty_text"),
        (texts("w1", "  "), None, "text 1 is empty", "empty_text"),
        (texts(b"\xff\xfe"), None, "text 0 is not valid UTF-8", "invalid_utf8"),
        (texts(*["w1 " * 30]), None, "text 0 is 30 tokens long; this model takes at most 23", "too_long"),
        (texts("w1 w2"), new_tokens(0), "max_new_tokens 0 is out of range: expected 1 to 23", "new_tokens_range"),
        (texts("w1 w2"), new_tokens(24), "max_new_tokens 24 is out of range: expected 1 to 23", "new_tokens_range"),
        (texts("w1 w2"), new_tokens(-3), "max_new_tokens -3 is out of range", "new_tokens_range"),
        (texts("w1", "w2"), new_tokens(4), "max_new_tokens has 1 values for 2 texts", "new_tokens_count"),
        (
            texts("w1 w2 w3 w4"),
            new_tokens(21),
            "text 0 is 4 tokens long; with max_new_tokens 21 this model takes at most 3",
            "too_long",
        ),
    ],
)
def test_each_malformed_request_is_refused_with_its_reason(model, text, asked, message, reason):
    with pytest.raises(InvalidRequest) as refused:
        model.check(text, asked)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert refused.value.reason == reason


def test_a_prompt_the_tokenizer_turns_into_no_tokens_is_refused():
    """Tokenizers that drop characters (normalizers) can leave a non-blank text with no tokens at all."""
    model = GenerateModel(lambda batch: {"input_ids": [[] for _ in batch]}, None, MAX_LENGTH, 23, 23)
    with pytest.raises(InvalidRequest, match="^text 0 has no tokens$") as refused:
        model.check(texts("\x00"))
    assert refused.value.reason == "empty_text"


def test_the_load_check_sends_short_generations_and_malformed_requests_the_model_refuses(model, tmp_path):
    inputs = load_inputs(model, list(LOAD_TEXTS[:2]))
    assert inputs["max_new_tokens"].tolist() == [[LOAD_NEW_TOKENS]] * 2 and inputs["max_new_tokens"].dtype == np.int32
    assert model.answer(inputs)["generated_ids"].shape == (2, LOAD_NEW_TOKENS)
    data = write_input_data(tmp_path / "data.json", list(LOAD_TEXTS[:2]), "text", load_extra(model))
    assert json.loads(data.read_text())["data"] == [{"text": [t], "max_new_tokens": [4]} for t in LOAD_TEXTS[:2]]
    http_cases, grpc_cases = malformed_cases(model, 4)
    extra_http, extra_grpc = generation_malformed(model)
    assert http_cases[-len(extra_http) :] == extra_http and len(grpc_cases) == 4 + len(extra_grpc)
    names = [case.name for case in extra_grpc]
    assert names[:3] == [
        "max_new_tokens 0",
        "max_new_tokens 24 (over 23)",
        "max_new_tokens of the wrong datatype (FP32)",
    ]
    assert names[3].startswith("prompt of ") and names[3].endswith("(over 24)")
    for case in grpc_cases:  # every case the model itself must refuse is refused in-process too
        if not case.by_model:
            continue
        asked = next((data for name, _, data in case.extra if name == "max_new_tokens"), None)
        with pytest.raises(InvalidRequest):
            model.check(case.data, asked)
    for case in extra_http:  # the HTTP bodies carry the same requests
        sent = {tensor["name"]: tensor for tensor in json.loads(case.body)["inputs"]}
        assert set(sent) == {"text", "max_new_tokens"} and sent["text"]["data"] == [LOAD_TEXTS[0]]


def generating_model_parameters(folder: Path) -> dict[str, str]:
    """A generating model's folder as Triton reads it: its config (parsed with Triton's ModelConfig) declares the
    prompt, the optional max_new_tokens and the two outputs, and model.py has decoding.py beside it; returns
    the config's parameters."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the [serve] extra")
    from google.protobuf import text_format

    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == folder.name and config.backend == "python" and config.max_batch_size == 4
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in config.input] == [
        ("text", model_config_pb2.TYPE_STRING, [1], False),
        ("max_new_tokens", model_config_pb2.TYPE_INT32, [1], True),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("generated_text", model_config_pb2.TYPE_STRING, [1]),
        ("generated_ids", model_config_pb2.TYPE_INT64, [-1]),
    ]
    assert filecmp.cmp(folder / "1" / "model.py", Path(triton_python_model.__file__), shallow=False)
    assert filecmp.cmp(folder / "1" / "decoding.py", Path(decoding.__file__), shallow=False)
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert params["mode"] == "generate"
    assert (params["max_length"], params["max_new_tokens"], params["default_new_tokens"]) == ("24", "23", "23")
    return params


def test_the_serve_repository_of_a_decoder_generates(generating_run, tmp_path):
    spec = served_spec(generating_run, 0, True)
    assert spec.describe_requests() == (
        "up to 4 prompts per request, each continued greedily by max_new_tokens tokens (1 to 23, default 23 or what "
        "fits), prompt and continuation within 24"
    )
    variants = write_serve_repository(tmp_path, spec, with_twins=True)
    for variant in variants:
        params = generating_model_parameters(tmp_path / variant.name)
        assert params["graph"] == str(spec.graph.resolve()) and params["threads"] == str(variant.threads)


def package_repository(run: Path, root: Path) -> dict:
    """The package stage's repository of ``run``'s CPU student (max batch 4, 24 tokens)."""
    spec = RepositorySpec(
        onnx_path=run / "export" / "student_qdq_cpu.onnx",
        plan=None,
        tokenizer=load_saved_tokenizer(run / "teacher" / "model"),
        task_kind="causal-lm",
        labels=(),
        max_batch_size=4,
        max_length=MAX_LENGTH,
    )
    return write_repository(root, spec)


def test_the_package_repository_of_a_decoder_generates_from_its_own_folder(generating_run, model, tmp_path):
    """No text ensemble (it could not feed the graph its cache): ``student_generate``, its folder holding the
    graph, the tokenizer and decoding.py, answers what the served model answers."""
    summary = package_repository(generating_run, tmp_path)
    assert summary["models"] == {"student_onnx": "onnxruntime_onnx", "student_generate": "python"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student_generate", "student_onnx"]
    params = generating_model_parameters(tmp_path / "student_generate")
    version = tmp_path / "student_generate" / "1"
    graph = version / params["graph"]
    assert filecmp.cmp(graph, generating_run / "export" / "student_qdq_cpu.onnx", shallow=False)
    assert params["threads"] == "0"
    packaged = GenerateModel.load(str(graph), str(version / params["tokenizer"]), generation_limits(MAX_LENGTH), 1)
    inputs = {"text": texts(*PROMPTS), "max_new_tokens": new_tokens(4, 4, 4, 4)}
    for name, value in packaged.answer(inputs).items():
        assert value.tolist() == model.answer(inputs)[name].tolist()


@pytest.mark.slow
def test_serve_load_check_on_a_decoder_run_passes_with_nothing_lost(generating_run, model):
    """``serve --load-check`` on the decoder run: answers over HTTP and gRPC equal the greedy generation
    in-process, perf_analyzer completes every level with 0 failed requests, and every malformed request (the text
    model's and the generation ones) is refused cleanly, counted, with the server serving after."""
    pytest.importorskip("pytriton", reason="serving needs the [serve] extra")
    from exporters.triton_server import free_ports

    ports = free_ports()
    command = [
        *(sys.executable, "-m", "pipeline.cli", "serve", str(generating_run), "--load-check"),
        *("--port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)),
        *("--concurrency", "1,2", "--window-ms", "1000", "--stability", "100"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((generating_run / "serve" / "load.json").read_text())
    assert report["passed"] and report["answers"]["passed"] and report["malformed"]["passed"]
    assert report["answers"]["http_max_abs_diff"] == report["answers"]["grpc_max_abs_diff"] == 0.0
    assert len(report["levels"]) == 8  # 3 models over HTTP and the served one over gRPC, at 2 concurrencies
    for level in report["levels"]:
        assert level["completed"] and level["server_failures"] == 0 and level["error"] is None, level
    http_cases, grpc_cases = malformed_cases(model, 4)
    cases = report["malformed"]["cases"]
    assert [case["request"] for case in cases] == [case.name for case in http_cases + grpc_cases]
    reasons = {case["reason"] for case in cases}
    assert "text 0 is not valid UTF-8" in reasons and "max_new_tokens 0 is out of range: expected 1 to 23" in reasons
    over_long = 2 * MAX_LENGTH + 8  # the check's over-long text: that many words, a token each here
    assert f"text 0 is {over_long} tokens long; this model takes at most 23" in reasons
    counters = report["malformed"]["counters"]
    assert counters["http_failures_seen"] == counters["zsaq_http_request_failure"] == len(http_cases)
    refused = sum(case.by_model for case in http_cases + grpc_cases)
    assert counters["model_refusals_seen"] == counters["zsaq_inference_request_refused"] == refused
    assert counters["nv_inference_request_failure"] == 0 and report["malformed"]["served_after"]
    assert report["request"] == "one prompt, 4 new tokens"
    assert "## Load (one prompt, 4 new tokens per request;" in (generating_run / "serve" / "report.md").read_text()


@pytest.mark.slow
def test_the_package_repositorys_generating_model_answers_in_a_real_triton_server(generating_run, model, tmp_path):
    """``student_generate`` as packaged (model.py importing its copy of decoding.py, the graph and tokenizer
    found through their paths relative to the version folder), alone in the Triton server PyTriton bundles
    (whose only backend is Python)."""
    pytest.importorskip("pytriton", reason="serving needs the [serve] extra")
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from exporters.triton_server import TritonServer, free_ports

    package_repository(generating_run, tmp_path / "package")
    (tmp_path / "repository").mkdir()
    (tmp_path / "package" / "student_generate").rename(tmp_path / "repository" / "student_generate")
    with TritonServer(tmp_path / "repository", ["student_generate"], free_ports(), tmp_path / "triton.log") as server:
        with httpclient.InferenceServerClient(server.http_url) as client:
            inputs = load_inputs(model, PROMPTS[:2])
            tensors = []
            for name, value in inputs.items():
                tensors.append(httpclient.InferInput(name, list(value.shape), "BYTES" if name == "text" else "INT32"))
                tensors[-1].set_data_from_numpy(value)
            result = client.infer("student_generate", tensors)
            for name, expected in model.answer(inputs).items():
                assert result.as_numpy(name).tolist() == expected.tolist()
            empty = httpclient.InferInput("text", [1, 1], "BYTES")
            empty.set_data_from_numpy(texts(""))
            with pytest.raises(InferenceServerException, match="text 0 is empty") as refused:
                client.infer("student_generate", [empty])
            assert refused.value.status() == "400"
