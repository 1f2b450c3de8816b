"""The latency regression check: baseline bookkeeping, its errors, and a real slowdown it must catch."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import compose, helper, numpy_helper

from calib.errors import ConfigError, StageUnavailable
from pipeline import latency_check
from pipeline.latency_check import Measurement, compare, median_measurement, read_baseline, record

KEY = "x86_64 avx2 | 2 threads | onnxruntime 1.0"


def _measurement(int8_b1: float, int8_b8: float = 2.4) -> Measurement:
    speedups = {"int8": {"b1x128": int8_b1, "b8x128": int8_b8}, "int4": {"b1x128": 1.0, "b8x128": 1.0}}
    p50 = {"fp32": {"b1x128": 20.0, "b8x128": 120.0}, "int8": {"b1x128": 10.0, "b8x128": 50.0}}
    p50["int4"] = p50["fp32"]
    return Measurement(KEY, speedups, p50)


def test_record_then_compare_flags_only_what_fell_beyond_the_tolerance(tmp_path):
    path = tmp_path / "baseline.json"
    record(_measurement(2.0), read_baseline(path), path)
    baseline = read_baseline(path)
    assert baseline["entries"][KEY]["speedups"]["int8"]["b1x128"] == 2.0
    assert compare(_measurement(1.5), baseline, "b.json") == []  # 25% lower: within the 30% tolerance
    failures = compare(_measurement(1.3), baseline, "b.json")
    assert failures == ["int8 b1x128: 1.30x faster than FP32, baseline 2.00x (more than 30% slower)"]


def test_a_recorded_entry_is_the_per_cell_median_of_several_measurements():
    runs = [_measurement(2.6, 2.0), _measurement(1.6, 2.5), _measurement(2.2, 2.4)]  # a fast and a slow phase
    runs[1].p50_ms["int8"]["b1x128"] = 14.0
    middle = median_measurement(runs)
    assert middle.key == KEY
    assert middle.speedups["int8"] == {"b1x128": 2.2, "b8x128": 2.4}  # medians cell by cell, not one run's row
    assert middle.p50_ms["int8"]["b1x128"] == 10.0 and middle.p50_ms["fp32"] == runs[0].p50_ms["fp32"]
    with pytest.raises(ValueError, match="one machine key"):
        median_measurement([runs[0], Measurement("another machine", runs[1].speedups, runs[1].p50_ms)])


def test_the_cli_times_the_checks_default_thread_count():
    from pipeline.cli import main

    threads = next(p for p in main.commands["bench"].params if p.name == "threads")
    assert threads.default == latency_check.DEFAULT_THREADS


def test_recording_keeps_other_machines_entries(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"tolerance": 0.1, "entries": {"other machine": {"speedups": {}}}}))
    record(_measurement(2.0), read_baseline(path), path)
    stored = json.loads(path.read_text())
    assert set(stored["entries"]) == {"other machine", KEY} and stored["tolerance"] == 0.1


def test_a_machine_without_a_baseline_is_told_how_to_record_one(tmp_path):
    with pytest.raises(StageUnavailable, match="no baseline for .* bench --record b.json"):
        compare(_measurement(2.0), read_baseline(tmp_path / "absent.json"), "b.json")


def test_a_corrupt_baseline_is_a_one_line_error(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable JSON baseline"):
        read_baseline(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="'entries' object"):
        read_baseline(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [([], "exactly one of --check"), (["--check", "BASELINE", "--repeats", "2"], "--repeats must be at least 4")],
)
def test_cli_refuses_bad_arguments_in_one_line(tmp_path, args, message):
    args = [a.replace("BASELINE", str(tmp_path / "b.json")) for a in args]
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", *args], capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_check_without_an_entry_for_this_machine_exits_before_measuring(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"entries": {}}))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "--check", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 3 and "bench --record" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_cli_check_with_missing_ok_measures_and_passes_on_a_new_machine_kind(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"entries": {"some other machine": {"speedups": {"int8": {"b1x128": 9.0}}}}}))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "--check", str(path), "--missing-ok", "--repeats", "4"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-1000:]
    assert "| int8 | b1x128 |" in done.stdout
    assert "not compared; record with: zsaq-pipeline bench --record" in done.stdout
    assert json.loads(path.read_text())["entries"].keys() == {"some other machine"}  # nothing recorded


def _compute_everything(times: int, path: Path) -> None:
    """Rewrite a graph so it does its work ``times`` times: copies with their own weights (so ONNX Runtime's
    common-subexpression elimination cannot merge them) whose first outputs are averaged with the original's."""
    model = onnx.load(path)
    graph = model.graph
    first = graph.output[0].name
    copies = [compose.add_prefix_graph(graph, f"again{i}_", rename_inputs=False) for i in range(1, times)]
    for node in graph.node:
        node.output[:] = ["once_" + name if name == first else name for name in node.output]
    for copy in copies:
        graph.node.extend(copy.node)
        graph.initializer.extend(copy.initializer)
    graph.initializer.append(numpy_helper.from_array(np.array(1.0 / times, dtype=np.float32), "share"))
    outputs = ["once_" + first, *(f"again{i}_{first}" for i in range(1, times))]
    graph.node.extend(
        [
            helper.make_node("Sum", outputs, ["sum_of_all"]),
            helper.make_node("Mul", ["sum_of_all", "share"], [first]),
        ]
    )
    onnx.save(model, path)


def test_the_repeated_graph_gives_the_same_output_as_the_original(tmp_path):
    """The slowdown below must be extra work, not a different model."""
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    weight = numpy_helper.from_array(np.arange(9, dtype=np.float32).reshape(3, 3), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    feed = {"x": np.ones((2, 3), dtype=np.float32)}
    before = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    _compute_everything(4, path)
    repeated = onnx.load(path)
    assert [n.op_type for n in repeated.graph.node].count("MatMul") == 4
    after = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(after, before)


@pytest.mark.slow
def test_the_check_fails_when_the_int8_path_is_made_slower_on_purpose(tmp_path):
    """Main's int8 graph recorded as the baseline; the int8 graph then made to compute everything four times
    (a quarter of its speed in principle; at least a 38% loss measured at twice) must fail the check at both
    shapes, beyond the 30% tolerance on any CPU.

    (It once slowed int8 by giving it one thread instead of two: on a CI machine whose two cores did not scale
    that was within the tolerance. Twice the work then lost only 38% at b8 and less than 30% at b1 once.)"""
    path = tmp_path / "baseline.json"
    threads = latency_check.DEFAULT_THREADS
    record(latency_check.measure(threads=threads, repeats=8), read_baseline(path), path)
    slowed = latency_check.measure(threads=threads, repeats=8, rewrite_int8=partial(_compute_everything, 4))
    failures = compare(slowed, read_baseline(path), str(path))
    assert {line.split(":")[0] for line in failures} >= {"int8 b1x128", "int8 b8x128"}, failures
