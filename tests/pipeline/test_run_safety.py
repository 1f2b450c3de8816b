"""Nothing lost, nothing half-done: --force and --resume touch only run folders, a forced run replaces the old
one only once it ran, a changed source model re-runs the teacher, a folder in use is refused, a damaged
manifest is one line, inspect says what is damaged, stale or interrupted, GGUF sources run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import Result
from transformers import BertConfig, BertForSequenceClassification

from pipeline.stages import STAGES
from tests.models import save_tiny_bert_folder, write_tiny_llama_gguf


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _one_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_force_and_resume_never_write_into_a_folder_the_tool_did_not_make(write_config, cli, tmp_path):
    user = tmp_path / "userdir"
    (user / "teacher").mkdir(parents=True)
    (user / "notes.txt").write_text("precious")
    (user / "teacher" / "mine.txt").write_text("mine")
    for flag in ("--force", "--resume"):
        result = cli("run", write_config(), "--out", user, flag)
        assert result.exit_code == 2 and "not a zsaq-pipeline run folder" in _one_line(result)
    assert (user / "notes.txt").read_text() == "precious" and (user / "teacher" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt", "teacher"]


def test_force_replaces_a_run_only_once_the_new_one_has_run(write_config, cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert cli("run", write_config(), "--out", run, "--quiet").exit_code == 0
    before = (run / "manifest.json").read_bytes()
    quantize = next(stage for stage in STAGES if stage.name == "quantize")

    def broken(ctx: object) -> dict:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(quantize, "run", broken)
    failed = cli("run", write_config({"calib": {"seed": 3}}), "--out", run, "--force", "--quiet")
    assert failed.exit_code == 1 and (run / "manifest.json").read_bytes() == before  # the old run, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "run"]  # no half-made run beside it
    monkeypatch.undo()
    assert cli("run", write_config({"calib": {"seed": 3}}), "--out", run, "--force", "--quiet").exit_code == 0
    assert _manifest(run)["config"]["calib"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "run"]


def test_resume_reruns_everything_when_the_source_model_changed(cli, tmp_path):
    model = save_tiny_bert_folder(tmp_path / "model", ("good", "bad", "movie"))
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{path: {model}}}\ntask: {{kind: classification}}\n"
        "calib: {method: random-tokens, samples: 8, seq_len: 16, batch_size: 8}\n"
        "validate: {shapes: [[1, 16]], repeats: 2, warmup: 1, samples: 8}\n"
    )
    run = tmp_path / "run"
    assert cli("run", config, "--out", run, "--quiet").exit_code == 0
    assert "[teacher] artifacts verified, skipping" in cli("run", config, "--out", run, "--resume").output
    torch.manual_seed(1)  # new weights under the same path and config
    BertForSequenceClassification(BertConfig.from_pretrained(model)).save_pretrained(model)
    resumed = cli("run", config, "--out", run, "--resume")
    assert resumed.exit_code == 0 and "[teacher] running" in resumed.output and "[export] running" in resumed.output


def test_a_run_folder_in_use_is_refused(write_config, cli, tmp_path):
    run = tmp_path / "run"
    assert cli("run", write_config(), "--out", run, "--quiet").exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(f"{holder.pid}\n")
        result = cli("run", write_config(), "--out", run, "--resume")
        assert result.exit_code == 1 and f"in use by process {holder.pid}" in _one_line(result)
    finally:
        holder.kill()
        holder.wait()
    assert cli("run", write_config(), "--out", run, "--resume", "--quiet").exit_code == 0  # a stale lock: taken over
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"zsaq_pipeline": "0.1.0", "stages": {"teacher": null}}'])
def test_a_damaged_manifest_is_one_line_naming_it(write_config, cli, tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(text)
    for args in (("inspect", run), ("run", write_config(), "--out", run, "--resume")):
        result = cli(*args)
        assert result.exit_code == 1 and "manifest.json: damaged manifest" in _one_line(result)


def test_inspect_says_what_is_damaged_stale_or_interrupted(write_config, cli, tmp_path):
    run = tmp_path / "run"
    assert cli("run", write_config(), "--out", run, "--quiet").exit_code == 0
    status = {s["name"]: s["status"] for s in json.loads(cli("inspect", run, "--json").output)["stages"]}
    assert status["quantize"] == "done" and status["build"] == "skipped"
    (run / "quantize" / "contract.json").unlink()
    manifest = _manifest(run)
    manifest["config"]["validate"]["repeats"] = 5  # as if the config changed after validate ran
    manifest["stages"]["validate"] = {**manifest["stages"]["validate"], "status": "running", "pid": 2**22 + 7}
    (run / "manifest.json").write_text(json.dumps(manifest))
    status = {s["name"]: s["status"] for s in json.loads(cli("inspect", run, "--json").output)["stages"]}
    assert status["quantize"].startswith("damaged (1 artifact(s) missing or changed: quantize/contract.json")
    assert status["validate"].startswith("interrupted") and status["export"] == "done"
    manifest["stages"]["validate"]["status"] = "done"
    (run / "manifest.json").write_text(json.dumps(manifest))
    status = {s["name"]: s["status"] for s in json.loads(cli("inspect", run, "--json").output)["stages"]}
    assert status["validate"].startswith("stale")


def test_dropping_an_export_format_on_resume_leaves_no_stale_folder(write_config, cli, tmp_path):
    run = tmp_path / "run"
    assert cli("run", write_config(), "--out", run, "--export", "triton", "--quiet").exit_code == 0
    assert (run / "package").is_dir()
    result = cli("run", write_config(), "--out", run, "--resume")
    assert result.exit_code == 0 and not (run / "package").exists()
    assert _manifest(run)["stages"]["package"]["status"] == "skipped"


def test_an_opset_is_honoured_or_refused(write_config, cli, tmp_path):
    import onnx

    run = tmp_path / "run"
    assert cli("run", write_config({"export": {"opset": 18}}), "--out", run, "--quiet").exit_code == 0
    for name in ("teacher_fp32.onnx", "student_qdq_trt.onnx", "student_qdq_cpu.onnx"):
        graph = onnx.load(str(run / "export" / name), load_external_data=False)
        assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 18, name
    refused = cli("run", write_config({"export": {"opset": 99}}), "--out", tmp_path / "other")
    assert refused.exit_code == 2 and "export.opset: expected 17 to 21" in _one_line(refused)


def test_a_gguf_source_runs_end_to_end(cli, tmp_path):
    pytest.importorskip("gguf", reason="GGUF sources need the [models] extra")
    gguf_file = write_tiny_llama_gguf(tmp_path / "model")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{path: {gguf_file.parent}, gguf_file: {gguf_file.name}}}\ntask: {{kind: causal-lm}}\n"
        "calib: {method: random-tokens, samples: 8, seq_len: 16, batch_size: 8}\n"
        "validate: {shapes: [[1, 16]], repeats: 2, warmup: 1, samples: 8}\n"
    )
    result = cli("run", config, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "teacher" / "model" / "config.json").read_text())
    assert saved["model_type"] == "llama" and "quantization_config" not in saved
    assert (tmp_path / "run" / "export" / "student_qdq_cpu.onnx").is_file()
