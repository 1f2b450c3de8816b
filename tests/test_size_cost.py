"""scripts/size_cost.py: measures SAM-SGA and the quantize stage on tiny random models and writes a sane report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from calib.config import ModelSource, RandomModel, TaskConfig
from calib.models import load_backbone
from tests.scripts import load_script

size_cost = load_script("size_cost")

SETTINGS = size_cost.Settings(threads=1, seq_len=32, batch_size=4, rounds=2, steps=2, init_samples=8)
PHASES = ("build_teacher", "student", "teacher_forward", "sam_sga", "learn_end_to_end", "learn_block_wise")


def _actual_params(name: str) -> int:
    shape = size_cost.SHAPES[name]
    task = TaskConfig(kind=shape.kind)
    model = load_backbone(ModelSource(random=RandomModel(shape.family, **shape.sizes)), task)
    return sum(p.numel() for p in model.parameters())


def _check_result(result: dict, name: str) -> None:
    shape = size_cost.SHAPES[name]
    assert result["shape"] == name and result["threads"] == 1
    assert result["params"] == _actual_params(name)
    assert 0 < result["quantized_params"] < result["params"]
    for label in PHASES:
        item = result["phases"][label]
        assert item["error"] is None, (label, item["error"])
        assert item["seconds"] > 0 and item["peak_gib"] > 0, label
        assert item["peak_gib"] >= item["rss_start_gib"] - 1e-6, label  # the peak is reset to what is resident
    game = result["phases"]["sam_sga"]["extra"]
    assert len(game["round_seconds"]) == SETTINGS.rounds and all(s > 0 for s in game["round_seconds"])
    assert sum(game["round_seconds"]) <= result["phases"]["sam_sga"]["seconds"]
    assert all(g > 0 and s > 0 for g, s in zip(game["generator_seconds"], game["student_seconds"]))
    assert result["phases"]["learn_end_to_end"]["extra"]["steps"] == SETTINGS.steps
    assert result["phases"]["learn_block_wise"]["extra"]["steps"] == shape.sizes["layers"]  # one step per block
    assert result["process_peak_gib"] >= max(result["phases"][label]["peak_gib"] for label in PHASES) - 1e-6


def test_measures_two_tiny_shapes_and_reports_their_growth(tmp_path: Path):
    names = ["tiny", "tiny-llama"]
    results = size_cost.measure_all(names, SETTINGS, isolate=False, show_progress=False)
    for result, name in zip(results, names):
        _check_result(result, name)
    info = {"command": size_cost.command_line(names, SETTINGS, tmp_path), "date": "today",
            "machine": size_cost.machine(), "settings": size_cost.asdict(SETTINGS), "shapes": {}}  # fmt: skip
    summary = size_cost.write_outputs(results, info, tmp_path)

    document = json.loads((tmp_path / "size_cost.json").read_text(encoding="utf-8"))
    assert [r["params"] for r in document["results"]] == [r["params"] for r in results]
    for key in ("round_s", "sam_sga_gib", "e2e_step_s", "block_step_s"):
        fit = summary["growth"][key]
        assert fit["shapes"] == 2 and math.isfinite(fit["exponent"]) and math.isfinite(fit["per_billion"])
        # two points: the log-log slope is exactly the ratio of the logs
        (a, b), (pa, pb) = [m[key] for m in summary["metrics"]], [r["params"] for r in results]
        assert fit["exponent"] == pytest.approx(math.log(b / a) / math.log(pb / pa))
    assert document["summary"]["growth"] == json.loads(json.dumps(summary["growth"]))

    text = (tmp_path / "size_cost.md").read_text(encoding="utf-8")
    assert info["command"] in text and "--shapes tiny,tiny-llama" in text
    rows = [line for line in text.splitlines() if line.startswith(("| tiny |", "| tiny-llama |"))]
    assert len(rows) == 2
    for row, result, metric in zip(rows, results, summary["metrics"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{result['params'] / 1e6:.1f} M" and cells[2] == "1"
        assert float(cells[7].split()[0]) == pytest.approx(metric["round_s"], abs=0.006)
    assert f"grows as params^{summary['growth']['round_s']['exponent']:.2f}" in text
    assert (tmp_path / "size_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_an_allocation_refused_is_a_result_and_other_errors_are_not():
    record: dict = {}
    with size_cost.phase(record, "big", 2.0):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes.")
    assert record["big"].seconds is None and record["big"].peak_gib > 0
    assert record["big"].error == "out of memory (address-space limit 2 GiB): 4 GiB more refused"
    with pytest.raises(ValueError), size_cost.phase(record, "bug", 0.0):
        raise ValueError("a bug")


def test_growth_needs_two_sizes():
    assert size_cost.fit_growth([1e6, 1e6], [1.0, 2.0]) is None
    assert size_cost.fit_growth([1e6, 4e6], [1.0, None]) is None
    fit = size_cost.fit_growth([1e6, 1e7, 1e8], [2.0, 20.0, 200.0])
    assert fit["exponent"] == pytest.approx(1.0) and fit["per_billion"] == pytest.approx(2000.0)


@pytest.mark.slow
def test_the_command_measures_each_shape_in_its_own_process(tmp_path: Path):
    result = CliRunner().invoke(
        size_cost.main,
        ["--shapes", "tiny", "--out", str(tmp_path), "--threads", "1", "--seq-len", "32", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "size_cost.json").read_text(encoding="utf-8"))
    (shape,) = document["results"]
    assert "worker_error" not in shape
    _check_result(shape, "tiny")
    assert "fewer than two shapes have it" in (tmp_path / "size_cost.md").read_text(encoding="utf-8")


def test_unknown_shapes_are_refused(tmp_path: Path):
    result = CliRunner().invoke(size_cost.main, ["--shapes", "tiny,gpt-5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown shape(s) gpt-5" in result.output
