"""scripts/profile_cpu_graphs.py: ONNX Runtime's profiler on a run's CPU graphs, one table per batch."""

from __future__ import annotations

import json

from click.testing import CliRunner

from tests.scripts import load_script

profile_cpu_graphs = load_script("profile_cpu_graphs")


def test_profiles_the_student_beside_the_dynamic_graph_and_writes_the_tables(text_run, tmp_path):
    out = tmp_path / "profile"
    args = [str(text_run), "--batches", "1,2", "--seq-len", "8", "--repeats", "2", "--rounds", "1", "--out", str(out)]
    result = CliRunner().invoke(profile_cpu_graphs.main, args)
    assert result.exit_code == 0, result.output
    figures = json.loads((out / "profile.json").read_text())
    run = text_run.name
    assert set(figures) == {f"{run}:student_qdq_cpu", f"{run}:teacher_ort_dynamic_int8"}
    student = figures[f"{run}:student_qdq_cpu"]["1"]
    assert student["p50_ms"] > 0 and student["ops_ms"].get("MatMulIntegerToFloat", 0) > 0  # the int8 kernels ran
    assert "DynamicQuantizeMatMul" in figures[f"{run}:teacher_ort_dynamic_int8"]["2"]["ops_ms"]
    text = (out / "profile.md").read_text()
    assert "### batch 1" in text and "### batch 2" in text and "| median ms |" in text
    assert not list(out.glob(".*")) and not (text_run / ".profile").exists()  # no profiler files left behind


def test_a_run_without_exported_graphs_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(profile_cpu_graphs.main, [str(tmp_path)])
    assert result.exit_code == 1 and "no such graph:" in result.output and "Traceback" not in result.output
