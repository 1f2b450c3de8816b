"""The stage runner end to end on tiny random models: manifest, resume, kill-and-resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pipeline.runfolder import sha256_file

STAGES_WITH_STABLE_ARTIFACTS = ("teacher", "calibrate", "quantize", "export")  # validate holds timings


def manifest_of(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One uninterrupted tiny run, shared by the tests that only read it."""
    import yaml
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.config import merge
    from tests.models import TINY

    folder = tmp_path_factory.mktemp("tiny")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(merge(TINY, {"export": {"int4_weight_only": [32]}})))
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    return folder / "run"


def test_manifest_lists_every_artifact_with_its_hash(tiny_run):
    manifest = manifest_of(tiny_run)
    assert manifest["config"]["model"]["random"]["family"] == "bert"
    assert len(manifest["config_sha256"]) == 64
    assert {"torch", "onnx", "onnxruntime", "transformers"} <= set(manifest["packages"])
    stages = manifest["stages"]
    assert [s for s in stages if stages[s]["status"] == "done"] == [
        "teacher",
        "calibrate",
        "quantize",
        "export",
        "validate",
    ]
    assert stages["build"]["status"] == "skipped" and stages["package"]["status"] == "skipped"
    for entry in stages.values():
        for rel, digest in entry.get("artifacts", {}).items():
            assert not Path(rel).is_absolute()
            assert sha256_file(tiny_run / rel) == digest
        if entry["status"] == "done":
            assert entry["seconds"] > 0
    assert not list(tiny_run.glob(".tmp-*")), "no staging folder may be left behind"


def test_exported_qdq_graph_is_valid_and_runs(tiny_run):
    path = tiny_run / "export" / "student_qdq_trt.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    # per block: one activation Q/DQ for Q, K and V together + 3 more; 6 weight DQs; the three int8 tables' rows
    assert ops.count("QuantizeLinear") == 2 * 4 and ops.count("DequantizeLinear") == 2 * (4 + 6) + 3
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(3, 500, size=(3, 20))
    out = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert out.shape == (3, 2) and np.isfinite(out).all()


def test_int4_weight_only_model_is_matmul_nbits_with_an_int8_embedding_table(tiny_run):
    summary = manifest_of(tiny_run)["stages"]["export"]["summary"]["w4a16_g32"]
    model = onnx.load(str(tiny_run / "export" / summary["file"]))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 * 6 and ops.count("DequantizeLinear") == 3  # the three int8 tables
    assert "QuantizeLinear" not in ops and summary["fraction_of_fp32"] < 0.5


def test_report_files_exist(tiny_run):
    report = json.loads((tiny_run / "validate" / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == [
        "fp32-pytorch",
        "student-pytorch",
        "fp32-onnx",
        "qdq-trt-flavour",
        "qdq-cpu-flavour",
        "w4a16-g32-cpu",
        "ort-dynamic-int8",
    ]
    rows = {m["name"]: m for m in report["models"]}
    assert rows["ort-dynamic-int8"]["reference"] == "fp32-pytorch" == rows["w4a16-g32-cpu"]["reference"]
    assert rows["qdq-cpu-flavour"]["reference"] == "student-pytorch"
    assert rows["w4a16-g32-cpu"]["size_mb"] < 0.5 * rows["fp32-onnx"]["size_mb"]
    assert rows["w4a16-g32-cpu"]["agreement"]["argmax_match"] > 0.5  # runs, and computes the same task
    assert report["fallback_reason"] == "the config names no evaluation data"
    assert (tiny_run / "validate" / "plot.png").stat().st_size > 1000
    assert "No task metric" in (tiny_run / "validate" / "report.md").read_text()


def test_existing_run_folder_is_not_overwritten(write_config, cli, tiny_run):
    before = (tiny_run / "manifest.json").read_bytes()
    result = cli("run", write_config(), "--out", tiny_run)
    assert result.exit_code == 1
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert (tiny_run / "manifest.json").read_bytes() == before


def test_resume_skips_verified_stages_and_reruns_tampered_ones(write_config, cli, tmp_path):
    config = write_config()
    run = tmp_path / "run"
    assert cli("run", config, "--out", run, "--quiet").exit_code == 0
    first = manifest_of(run)["stages"]
    (run / "export" / "teacher_fp32.onnx").write_bytes(b"corrupted")
    result = cli("run", config, "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert "[quantize] artifacts verified, skipping" in result.output
    assert "[export] running" in result.output
    second = manifest_of(run)["stages"]
    assert second["export"]["artifacts"] == first["export"]["artifacts"]
    assert second["quantize"]["seconds"] == first["quantize"]["seconds"]


def test_changed_config_section_reruns_its_stage_on_resume(write_config, cli, tmp_path):
    run = tmp_path / "run"
    assert cli("run", write_config(), "--out", run, "--quiet").exit_code == 0
    changed = write_config({"quant": {"activations": {"init": "minmax"}}}, name="changed.yaml")
    result = cli("run", changed, "--out", run, "--resume")
    assert result.exit_code == 0
    assert "[calibrate] artifacts verified, skipping" in result.output
    assert "[quantize] running" in result.output


def test_trt_export_without_tensorrt_keeps_onnx_and_says_how_to_build_later(write_config, cli, tmp_path):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the unavailable path cannot be shown")
    except ImportError:
        pass
    run = tmp_path / "run"
    result = cli("run", write_config(), "--out", run, "--export", "trt", "--quiet")
    assert result.exit_code == 3
    line = result.stderr.strip()
    assert "TensorRT is not installed" in line and "--resume --export trt" in line and len(line.splitlines()) == 1
    assert (run / "export" / "student_qdq_trt.onnx").is_file()
    assert manifest_of(run)["stages"]["build"]["status"] == "unavailable"


def _stable_artifacts(run: Path) -> dict[str, str]:
    stages = manifest_of(run)["stages"]
    return {rel: digest for name in STAGES_WITH_STABLE_ARTIFACTS for rel, digest in stages[name]["artifacts"].items()}


KILL_CASES = {
    # stage to kill -> config that makes it last a few seconds
    "quantize": {"quant": {"learn": {"steps": 400}}, "calib": {"samples": 64}},
    "calibrate": {
        "calib": {
            "method": "zsaq",
            "samples": 16,
            "generator": {"batch_size": 4},
            "sam_sga": {"rounds": 120, "checkpoint_every": 10},
        }
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KILL_CASES))
def test_sigkill_mid_stage_then_resume_matches_an_uninterrupted_run(write_config, tmp_path, stage):
    """Kill the process inside a long stage, resume, and compare every stable artifact's sha256.

    For zsaq the calibrate stage resumes from its last SAM-SGA checkpoint, not from the start."""
    config = write_config(KILL_CASES[stage])
    command = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--quiet"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([*command, "--out", str(reference)], check=True, timeout=900)

    process = subprocess.Popen([*command, "--out", str(killed)], start_new_session=True)
    running = f'"{stage}": {{\n      "status": "running"'
    checkpoints = killed / ".ckpt-calibrate"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        manifest = killed / "manifest.json"
        if manifest.is_file() and running in manifest.read_text():
            if stage != "calibrate" or any(checkpoints.glob("*.pt")):
                break
        time.sleep(0.05)
    else:
        pytest.fail(f"the {stage} stage never got going")
    time.sleep(1.0)  # well inside the stage
    assert process.poll() is None, "the run finished before it could be killed: make the stage longer"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert manifest_of(killed)["stages"][stage]["status"] == "running"
    assert not (killed / stage).exists() and (killed / f".tmp-{stage}").exists()

    resumed = subprocess.run([*command, "--out", str(killed), "--resume"], check=True, timeout=900)
    assert resumed.returncode == 0
    assert _stable_artifacts(killed) == _stable_artifacts(reference)
    assert not (killed / f".tmp-{stage}").exists() and not checkpoints.exists()


def test_resume_with_export_trt_reruns_only_the_build_stage(write_config, cli, tmp_path):
    """export.formats is read by no stage's fingerprint: adding trt only adds the build."""
    config, run = write_config(), tmp_path / "run"
    assert cli("run", config, "--out", run, "--export", "onnx", "--quiet").exit_code == 0
    before = manifest_of(run)["stages"]
    result = cli("run", config, "--out", run, "--resume", "--export", "trt")
    for stage in ("teacher", "calibrate", "quantize", "export", "validate"):
        assert f"[{stage}] artifacts verified, skipping" in result.output
    assert "[build] running" in result.output and "[package]" not in result.output
    after = manifest_of(run)["stages"]
    assert all(after[s] == before[s] for s in ("teacher", "calibrate", "quantize", "export", "validate"))
    assert after["build"]["status"] in ("done", "unavailable")  # unavailable: no TensorRT on this machine
    assert result.exit_code == (0 if after["build"]["status"] == "done" else 3)


def test_a_stage_reruns_only_for_the_config_keys_it_reads(write_config, cli, tmp_path):
    run = tmp_path / "run"
    assert cli("run", write_config(), "--out", run, "--quiet").exit_code == 0
    changed = write_config({"validate": {"repeats": 3}, "task": {"num_labels": 2}}, name="changed.yaml")
    result = cli("run", changed, "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert "[export] artifacts verified, skipping" in result.output and "[validate] running" in result.output
