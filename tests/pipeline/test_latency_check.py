"""The latency regression check: baseline bookkeeping, its errors, and a real slowdown it must catch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from calib.errors import ConfigError, StageUnavailable
from pipeline import latency_check
from pipeline.latency_check import Measurement, compare, read_baseline, record

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


@pytest.mark.slow
def test_the_check_fails_when_the_int8_path_is_made_slower_on_purpose(tmp_path):
    """Main's int8 graph recorded as the baseline (2 threads for every model); the int8 model then run on one
    thread (about half its speed, beyond the 30% tolerance on any CPU) must fail the check."""
    path = tmp_path / "baseline.json"
    record(latency_check.measure(threads=2, repeats=8), read_baseline(path), path)
    slowed = latency_check.measure(threads=2, repeats=8, int8_threads=1)
    failures = compare(slowed, read_baseline(path), str(path))
    assert any(line.startswith("int8 b8x128") for line in failures), failures
