"""The comparison-table harness: spec and row checks, which cells run, each procedure's student, the rendered
table."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner

from calib.config import CalibConfig, QuantConfig, TaskConfig
from calib.errors import ConfigError
from calib.inputs import random_tokens
from calib.methods import CalibrationRequest, calibrate
from calib.models import frozen_teacher, load_backbone, load_source_tokenizer
from calib.student import activation_quantizers, quant_layers
from exporters.cpu_kernels import machine_description, ort_session
from exporters.decoding import run_full_sequence
from exporters.metrics import fidelity
from exporters.onnx_export import export_onnx, teacher_export_model
from exporters.peer_graphs import MODELOPT_PYTHON_ENV, ort_int4_graph, ort_static_graph, sample_feeds
from exporters.validation import build_eval_inputs
from pipeline import benchmark
from pipeline.benchmark import Cell, load_spec, planned_cells, task_config
from pipeline.benchmark_cell import PROCEDURES, STUDENTS, run_cell
from pipeline.benchmark_report import TableData, render_markdown
from pipeline.benchmark_rows import load_rows, row_patch
from pipeline.cli import main
from pipeline.config import load_config
from tests.models import discrepancy, save_tiny_bert_folder, tiny_teacher

CATALOGUE = Path(__file__).resolve().parents[2] / "bench" / "rows.yaml"
ROWS = load_rows(CATALOGUE)

WORDS = ("the", "a", "movie", "film", "good", "bad", "great", "not", "is", "it", "and", "plot", "dull", "fun")
SENTENCES = [("a good movie", 1), ("the plot is dull", 0), ("great fun", 1), ("not good", 0), ("it is bad", 0)]


@pytest.fixture
def bench_files(tmp_path: Path) -> Path:
    """A spec with one classification task on a tiny BERT folder, a dev file and a training file."""
    model = save_tiny_bert_folder(tmp_path / "tiny-bert", WORDS)
    for name, rows in (("dev.tsv", SENTENCES * 4), ("train.tsv", SENTENCES * 8)):
        lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in rows]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "model": {"path": str(model)},
        "task": {"kind": "classification", "eval": {"data": "dev.tsv", "metric": "accuracy"}},
        "calib": {
            "samples": 8,
            "seq_len": 8,
            "generator": {"kind": "soft-tokens", "batch_size": 4, "min_len": 4},  # no generator LM in these tests
            "sam_sga": {"rounds": 3, "select_every": 2},
        },
        "quant": {"weights": {"bits": 4}, "activations": {"init": "minmax"}},
        "validate": {"shapes": [[1, 8], [2, 8]]},
    }
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    spec = {
        "catalogue": str(CATALOGUE),
        "seeds": [0, 1],
        "tasks": {"tiny": {"config": "task.yaml", "column": "tiny acc", "real_data": "train.tsv"}},
        "claims": [["zsaq-w4a8", "ptq-random-w4a8"]],
        "latency": {"config": "task.yaml", "repeats": 4},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tasks: {}\n", "tasks: expected a mapping of task name"),
        ("tasks: {a: {config: nowhere.yaml}}\n", "tasks.a.config: expected an existing"),
        ("colour: red\n", "colour: unknown key (expected one of: tasks, catalogue, rows"),
        ("tasks: {a: {config: task.yaml}}\nseeds: [zero]\n", "seeds[0]: expected an integer"),
        ("[unclosed", "not valid YAML"),
        ("tasks: {a: {config: task.yaml}}\nrows: [nope]\n", "unknown row 'nope'"),
        ("tasks: {a: {config: task.yaml}}\nclaims: [[fp32]]\n", "claims[0]: expected a list of 2 items"),
        ("tasks: {a: {config: task.yaml}}\nlatency: {config: task.yaml, repeats: 2}\n", "latency.repeats: expected 4"),
    ],
)
def test_a_bad_spec_is_a_one_line_error(bench_files, spec, message):
    path = bench_files / "bad.yaml"
    path.write_text(f"catalogue: {CATALOGUE}\n" + spec, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_spec(path)


def test_a_bad_row_catalogue_is_a_one_line_error(tmp_path):
    for text, message in (
        ("- {key: a, label: A}\n", "rows[0].method: required key is missing"),
        ("- {key: a, label: A, method: magic}\n", "rows[0].method: expected one of fp32, rtn"),
        ("- {key: a, label: A, method: ptq, inputs: dreams}\n", "rows[0].inputs: expected one of zsaq, random-tokens"),
        ("- {key: a, label: A, method: ptq, colour: red}\n", "rows[0].colour: unknown key"),
    ):
        (tmp_path / "rows.yaml").write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_rows(tmp_path / "rows.yaml")


def test_every_catalogue_method_has_a_procedure():
    assert {row.method for row in ROWS.values()} <= set(PROCEDURES) | set(STUDENTS)
    assert {r.key for r in ROWS.values() if r.uses_data} == {
        "ptq-real-w4a8",
        "qat-real-w4a8",
        "qat-real-w2a8",
        "qat-real-long-w4a16-g64",
        "qat-real-long-seq128-w4a16-g64",
    }
    assert ROWS["zsaq-w2a8"].latency_format is None  # no runtime executes 2-bit weights


def test_cells_follow_the_rows_kinds_seeds_and_filters(bench_files):
    spec = load_spec(bench_files / "spec.yaml")
    cells = planned_cells(spec)
    keys = {(c.row.key, c.seed) for c in cells}
    assert ("fp32", 0) in keys and ("fp32", 1) not in keys  # unseeded rows run once
    assert ("zsaq-w4a8", 0) in keys and ("zsaq-w4a8", 1) in keys
    assert not any(c.row.key in ("llmqat-w4a16", "zsaq-w4a16") for c in cells)  # decoder-only rows
    assert {c.row.key for c in planned_cells(spec, rows=("ptq-real-w4a8",))} == {"ptq-real-w4a8"}
    with pytest.raises(ConfigError, match="unknown row 'nope'"):
        planned_cells(spec, rows=("nope",))
    with pytest.raises(ConfigError, match="unknown task 'other'"):
        planned_cells(spec, tasks=("other",))


def test_a_row_patches_the_task_config_with_its_switches_scheme_and_seed(bench_files):
    spec = load_spec(bench_files / "spec.yaml")
    task = spec.tasks[0]
    config = task_config(spec, task, row_patch(ROWS["zsaq-no-ascent-w4a8"], seed=5, real_data=None))
    assert config.quant.weights.bits == 4 and config.quant.activations.bits == 8
    assert config.calib.seed == 5 and config.calib.method == "zsaq"
    assert config.calib.sam_sga.adversarial is False and config.calib.sam_sga.sam is True
    assert task_config(spec, task, row_patch(ROWS["qat-random-w4a16"], 0, None)).quant.activations.bits == 16
    real = task_config(spec, task, row_patch(ROWS["qat-real-w4a8"], 0, "train.tsv"))
    assert real.calib.real_data == str(bench_files / "train.tsv") and real.calib.method == "real-data"


def test_each_procedure_makes_its_own_student_from_one_quantizer(bench_files):
    spec = load_spec(bench_files / "spec.yaml")
    teacher = tiny_teacher("bert", hidden=64)
    batches = random_tokens(16, 16, 512, seed=9).batches(8)
    students, records = {}, {}
    for key in ("rtn-w8a16", "ptq-random-w4a8", "qat-random-w4a8", "gptq-random-w4a8"):
        row = ROWS[key]
        config = task_config(spec, spec.tasks[0], row_patch(row, 0, None))
        students[key], records[key] = STUDENTS[row.method](config, teacher, None)
    assert records["rtn-w8a16"] == {}  # nothing calibrated, nothing learned
    assert records["qat-random-w4a8"]["quantize_minutes"] > 0 and "game" not in records["qat-random-w4a8"]
    assert not activation_quantizers(students["rtn-w8a16"])  # weight-only: activations stay float
    ptq, qat, gptq = (quant_layers(students[k]) for k in ("ptq-random-w4a8", "qat-random-w4a8", "gptq-random-w4a8"))
    name = next(iter(ptq))
    assert torch.equal(ptq[name].weight, qat[name].weight)  # QAT learns step sizes, not weights
    assert not torch.equal(ptq[name].weight_quantizer.scale, qat[name].weight_quantizer.scale)
    assert not torch.equal(ptq[name].weight, gptq[name].weight)  # GPTQ moves weights along the grid
    assert discrepancy(teacher, students["qat-random-w4a8"], batches) < discrepancy(
        teacher, students["ptq-random-w4a8"], batches
    )


def test_fidelity_counts_every_flip_for_classifiers_and_cosine_for_embeddings():
    fp = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    flipped_both_ways = np.array([[0.0, 2.0], [2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    assert fidelity(fp, flipped_both_ways, "classification") == pytest.approx(50.0)
    embeddings = np.array([[1.0, 0.0], [1.0, 1.0]])
    turned = np.array([[1.0, 1.0], [2.0, 2.0]])  # 45 degrees off, then the same direction
    assert fidelity(embeddings, turned, "embedding") == pytest.approx(100 * (np.sqrt(0.5) + 1.0) / 2)
    scores = np.array([[0.1], [0.9], [0.4]])  # a regression head: the correlation of the two models' scores
    assert fidelity(scores, 2 * scores + 1, "classification") == pytest.approx(100.0)
    assert fidelity(scores, -scores, "classification") == pytest.approx(-100.0)


def test_real_data_draws_a_seeded_subset_and_reads_pairs_as_the_model_does(bench_files):
    config = load_config(bench_files / "task.yaml")
    tokenizer = load_source_tokenizer(config.model)
    teacher = tiny_teacher("bert")
    pairs = bench_files / "pairs.tsv"
    pairs.write_text(
        "sentence1\tsentence2\tscore\n"
        + "".join(f"{WORDS[i % len(WORDS)]} movie\tthe {WORDS[i // 3 % len(WORDS)]}\t{i % 5}.0\n" for i in range(40))
    )

    def draw(seed: int, kind: str, path: Path) -> torch.Tensor:
        calib = CalibConfig(method="real-data", seed=seed, real_data=str(path), samples=6, seq_len=8)
        request = CalibrationRequest(teacher, tokenizer, calib, QuantConfig(), TaskConfig(kind=kind))
        return calibrate(request).samples.input_ids

    assert torch.equal(
        draw(0, "classification", bench_files / "train.tsv"), draw(0, "classification", bench_files / "train.tsv")
    )
    assert not torch.equal(draw(0, "classification", pairs), draw(1, "classification", pairs))
    sep = tokenizer.sep_token_id
    assert ((draw(0, "classification", pairs) == sep).sum(1) == 2).all()  # a classifier reads the pair together
    assert ((draw(0, "embedding", pairs) == sep).sum(1) == 1).all()  # an embedding model reads each sentence alone


def test_the_table_is_rendered_from_the_cells_that_exist(bench_files):
    spec = load_spec(bench_files / "spec.yaml")
    out = bench_files / "out"
    task = spec.tasks[0]
    for key, seed, metric in (
        ("fp32", 0, 80.0),
        ("zsaq-w4a8", 0, 78.0),
        ("zsaq-w4a8", 1, 76.0),
        ("ptq-random-w4a8", 0, 70.0),
    ):
        path = Cell(task, ROWS[key], seed).path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        cell = {"metric": metric, "minutes": 1.0, "peak_gib": 0.5, "seed": seed}
        if key != "fp32":  # cells made before cells recorded their machine have no such field
            cell["machine"] = "Zen (2 cores, x86_64 avx2)"
        path.write_text(json.dumps(cell))
    Cell(task, ROWS["gptq-random-w4a8"], 0).path(out).with_suffix(".error.txt").write_text("boom: out of memory\n")
    text = render_markdown(TableData(spec, out), "cmd")
    line = {
        row.split(" | ")[0].lstrip("| ") + " " + row.split(" | ")[1]: row
        for row in text.splitlines()
        if row.startswith("| ")
    }
    assert "77.00 ± 1.41" in line["ZSAQ (SAM-SGA) W4A8"]
    assert "70.00 (1/2 seeds)" in line["static PTQ on random tokens W4A8"]
    assert "failed: boom: out of memory" in line["GPTQ on generated (random-token) inputs W4A8"]
    assert "pending" in line["QAT on random tokens W8A8"]
    assert "n/a" in line["ZSAQ (SAM-SGA) W4A16"]
    # paired by seed only where both rows have it (the PTQ row has seed 0 only)
    assert "ZSAQ (SAM-SGA) W4A8 vs static PTQ on random tokens W4A8: +7.00 points (by seed: +8.00)" in text
    assert "Cells ran on: Zen (2 cores, x86_64 avx2) (3 cells); not recorded (1 cells)." in text
    assert "in one run on a machine its cell does not record" in text  # no latency cell here
    Cell(task, ROWS["fp32"], 0).path(out).write_text("{truncated")
    with pytest.raises(ConfigError, match="tiny__fp32__s0.json: not a benchmark cell"):
        TableData(spec, out)


def test_an_average_column_means_the_tasks_seed_by_seed_and_its_claims_are_paired(bench_files):
    """``average``: a row's mean over the tasks for each seed it has on every task (an unseeded row: its one
    value per task), mean ± std over those seeds; the spec's claims are also made on the average."""
    spec_file = yaml.safe_load((bench_files / "spec.yaml").read_text())
    spec_file["tasks"]["twin"] = {**spec_file["tasks"]["tiny"], "column": "twin acc"}
    spec_file["average"] = "two-task average"
    (bench_files / "avg.yaml").write_text(yaml.safe_dump(spec_file), encoding="utf-8")
    spec = load_spec(bench_files / "avg.yaml")
    out = bench_files / "out-avg"
    metrics = {("tiny", "fp32", 0): 80.0, ("twin", "fp32", 0): 60.0,
               ("tiny", "zsaq-w4a8", 0): 78.0, ("tiny", "zsaq-w4a8", 1): 74.0, ("twin", "zsaq-w4a8", 0): 58.0,
               ("twin", "zsaq-w4a8", 1): 56.0, ("tiny", "ptq-random-w4a8", 0): 70.0,
               ("tiny", "ptq-random-w4a8", 1): 72.0, ("twin", "ptq-random-w4a8", 0): 50.0}  # fmt: skip
    for (task_name, key, seed), metric in metrics.items():
        task = next(t for t in spec.tasks if t.name == task_name)
        path = Cell(task, ROWS[key], seed).path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"metric": metric, "minutes": 1.0, "peak_gib": 0.5, "seed": seed}))
    text = render_markdown(TableData(spec, out), "cmd")
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert "| tiny acc | twin acc | two-task average |" in header
    line = {row.split(" | ")[0].lstrip("| ") + " " + row.split(" | ")[1]: row for row in text.splitlines()
            if row.startswith("| ")}  # fmt: skip
    assert "| 70.00 |" in line["FP32 teacher FP32"]
    assert "| 66.50 ± 2.12 |" in line["ZSAQ (SAM-SGA) W4A8"]  # seeds 0 and 1: (78 + 58) / 2, (74 + 56) / 2
    assert "| 60.00 (1/2 seeds) |" in line["static PTQ on random tokens W4A8"]  # seed 1 lacks the twin task
    assert "| pending |" in line["QAT on random tokens W4A8"]
    claim = "- two-task average: ZSAQ (SAM-SGA) W4A8 vs static PTQ on random tokens W4A8: +6.50 points (by seed: +8.00)"
    assert claim in text
    per_task = "- tiny: ZSAQ (SAM-SGA) W4A8 vs static PTQ on random tokens W4A8"
    assert per_task in text
    brief = render_markdown(TableData(spec, out), "cmd", brief=True)  # the README's block: the average alone
    assert claim in brief and per_task not in brief and "each task's in [table.md](table.md)" in brief


def test_an_exported_spec_scores_each_rows_cpu_onnx_and_says_why_a_row_has_none(bench_files):
    """``exported: true``: the FP32 graph scores as the teacher, a student's CPU flavour as the student (W8A8:
    within one flip of 20 rows), a 2-bit student has no CPU graph and its cell says why; the table shows both."""
    spec_path = bench_files / "spec.yaml"
    spec_path.write_text(spec_path.read_text() + "exported: true\n", encoding="utf-8")
    spec = load_spec(spec_path)
    task, out = spec.tasks[0], bench_files / "out"
    for key in ("fp32", "ptq-random-w8a8", "zsaq-w2a8"):
        cell = run_cell(spec, task, ROWS[key], 0)
        if key == "zsaq-w2a8":
            assert cell["exported_metric"] is None and "2-bit" in cell["exported_error"]
            game = cell["game"]  # the game's record: held-out checks at rounds 0, 2 and the last, the one kept
            assert [r for r, _ in game["held_out"]] == [0, 2, 3] and game["selected_round"] in (0, 2, 3)
            assert game["student_minutes"] > 0 and game["generator_minutes"] > 0
            assert cell["calibrate_minutes"] >= game["student_minutes"] + game["generator_minutes"]
        else:
            assert abs(cell["exported_metric"] - cell["metric"]) <= (0.0 if key == "fp32" else 5.0)
        path = Cell(task, ROWS[key], 0).path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell))
    text = render_markdown(TableData(spec, out), "cmd")
    assert "| tiny acc, exported CPU ONNX |" in text
    w2 = next(line for line in text.splitlines() if line.startswith("| ZSAQ (SAM-SGA) | W2A8"))
    assert "not exported: " in w2


@pytest.mark.slow
def test_bench_table_runs_cells_in_their_own_processes_and_writes_md_csv_png(bench_files):
    out = bench_files / "out"
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "bench",
        "--table",
        str(bench_files / "spec.yaml"),
        "--out",
        str(out),
    ]
    rows = ["fp32", "rtn-w8a16", "ptq-real-w4a8", "gptq-random-w4a8"]
    done = subprocess.run(
        [*command, *[a for r in rows for a in ("--rows", r)], "--seeds", "0"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert cells == sorted([*(f"tiny__{r}__s0.json" for r in rows), "latency.json"])
    latency = json.loads((out / "cells" / "latency.json").read_text())
    assert all(json.loads((out / "cells" / c).read_text())["machine"] == machine_description() for c in cells)
    assert (
        latency["shapes"] == ["b1x8", "b2x8"]
        and latency["speedup"]["fp32"]["b1x8"] == 1.0
        and latency["size_mb"]["w4a16"] < latency["size_mb"]["fp32"]
    )
    with open(out / "table.csv", encoding="utf-8") as handle:
        written = {r["row"]: r for r in csv.DictReader(handle)}
    assert set(written) == set(rows) and written["ptq-real-w4a8"]["uses_data"] == "True"
    assert 0.0 <= float(written["fp32"]["mean"]) <= 100.0
    table = (out / "table.md").read_text()
    assert (out / "table.png").stat().st_size > 0 and "no (uses data)" in table
    assert f"side by side in one run on {machine_description()} (" in table
    readme = bench_files / "README.md"
    # two tables in one README: each spec fills its own block (this spec, spec.yaml: bench-table:spec)
    readme.write_text(
        "# Title\n<!-- bench-table:start -->\nmain\n<!-- bench-table:end -->\n"
        "<!-- bench-table:spec:start -->\nold\n<!-- bench-table:spec:end -->\nafter\n"
    )
    shown = subprocess.run([*command, "--render-only", "--readme", str(readme)], capture_output=True, text=True)
    text = readme.read_text()
    assert shown.returncode == 0 and "old" not in text and text.endswith("<!-- bench-table:spec:end -->\nafter\n")
    assert "<!-- bench-table:start -->\nmain\n<!-- bench-table:end -->" in text  # the other table's block stays
    assert "](out/table.png)" in text and "| static PTQ on real task data (uses data) | W4A8 | no (uses data) |" in text
    again = subprocess.run([*command, "--rows", "fp32"], capture_output=True, text=True)  # every cell is there
    assert again.returncode == 0 and json.loads((out / "cells" / "latency.json").read_text()) == latency


def test_bench_table_refuses_a_missing_out_and_a_bad_spec_in_one_line(bench_files):
    for args, message in (
        (["--table", str(bench_files / "spec.yaml")], "give --out FOLDER"),
        (["--table", str(bench_files / "absent.yaml"), "--out", "x"], "absent.yaml: bench spec not found"),
        (["--table", str(bench_files / "spec.yaml"), "--check", "b.json"], "exactly one of"),
        (
            ["--table", str(bench_files / "spec.yaml"), "--out", "x", "--readme", str(bench_files / "task.yaml")],
            "has no '<!-- bench-table:spec:start -->'",
        ),
    ):
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", *args], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_list_cells_prints_the_planned_cell_ids_one_a_line(bench_files):
    spec = load_spec(bench_files / "spec.yaml")
    table = ["bench", "--table", str(bench_files / "spec.yaml")]
    listed = CliRunner().invoke(main, [*table, "--list-cells"])
    assert listed.exit_code == 0 and listed.stderr == ""
    assert listed.stdout.splitlines() == ["latency", *(c.id for c in planned_cells(spec))]
    some = CliRunner().invoke(main, [*table, "--list-cells", "--rows", "zsaq-w4a8", "--seeds", "1"])
    assert some.stdout == "tiny__zsaq-w4a8__s1\n"  # no fp32 row: no latency cell (as a run with --rows does)


def test_cell_runs_only_the_named_cells_writes_no_table_and_refuses_unknown_ids(bench_files, monkeypatch):
    ran = []

    def fake_run(command: list[str], failure_file: Path) -> bool:
        ran.append(command[command.index("--out") + 1])
        Path(ran[-1]).parent.mkdir(parents=True, exist_ok=True)
        Path(ran[-1]).write_text("{}")
        return True

    monkeypatch.setattr(benchmark, "_run", fake_run)
    out = bench_files / "out"
    table = ["bench", "--table", str(bench_files / "spec.yaml"), "--out", str(out)]
    done = CliRunner().invoke(main, [*table, "--cell", "tiny__zsaq-w4a8__s1", "--cell", "latency"])
    assert done.exit_code == 0 and done.stdout == "", done.output
    assert ran == [str(out / "cells" / "latency.json"), str(out / "cells" / "tiny__zsaq-w4a8__s1.json")]
    assert sorted(p.name for p in out.iterdir()) == ["cells"]  # the table is made once, by --render-only
    again = CliRunner().invoke(main, [*table, "--cell", "latency"])
    assert again.exit_code == 0 and len(ran) == 2 and "latency: skipped" in again.stderr
    planned = len(planned_cells(load_spec(bench_files / "spec.yaml"))) + 1  # and latency
    for args, message in (
        (["--cell", "tiny__fp32__s7"], f"bench --cell: unknown cell 'tiny__fp32__s7' (list the {planned} cells: "),
        (["--cell", "latency", "--rows", "rtn-w8a16"], "--list-cells --rows rtn-w8a16)"),
        (["--cell", "latency", "--render-only"], "make the table with --render-only"),
        (["--cell", "latency", "--list-cells"], "give --list-cells or --cell ID, not both"),
    ):
        refused = CliRunner().invoke(main, [*table, *args])
        assert refused.exit_code == 2 and message in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert len(ran) == 2

    def failing_run(command: list[str], failure_file: Path) -> bool:
        failure_file.parent.mkdir(parents=True, exist_ok=True)
        failure_file.write_text("boom: out of memory\n")
        return False

    monkeypatch.setattr(benchmark, "_run", failing_run)
    table[-1] = str(bench_files / "other")
    failed = CliRunner().invoke(main, [*table, "--cell", "tiny__fp32__s0", "--cell", "latency"])
    assert failed.exit_code == 1 and failed.stdout == ""
    assert failed.stderr == "error: bench: 2 cell(s) failed, first: latency: boom: out of memory\n"


@pytest.mark.slow
def test_cells_run_by_two_xargs_workers_make_the_table_a_serial_run_makes(bench_files):
    # an embedding task: fidelity (cosine to FP32) tells every quantized cell apart to many digits, where the
    # tiny classifier's accuracy and agreement are the same for every row; no latency cell (timings differ)
    pairs = "".join(f"{WORDS[i % 14]} movie\tthe {WORDS[i // 3 % 14]}\t{i % 5}.0\n" for i in range(40))
    (bench_files / "pairs.tsv").write_text("sentence1\tsentence2\tscore\n" + pairs, encoding="utf-8")
    config = yaml.safe_load((bench_files / "task.yaml").read_text())
    config["task"] = {"kind": "embedding", "eval": {"data": "pairs.tsv", "metric": "spearman"}}
    (bench_files / "emb.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    spec = {"catalogue": str(CATALOGUE), "seeds": [0, 1], "tasks": {"emb": {"config": "emb.yaml"}}, "fidelity": True}
    spec["rows"] = ["fp32", "rtn-w8a16", "zsaq-w4a8"]
    (bench_files / "par.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    bench = f"{shlex.quote(sys.executable)} -m pipeline.cli bench --table {shlex.quote(str(bench_files / 'par.yaml'))}"
    serial, spread = bench_files / "serial", bench_files / "spread"

    def shell(command: str) -> str:
        done = subprocess.run(command, shell=True, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    shell(f"{bench} --out {serial}")
    ids = shell(f"{bench} --list-cells").split()
    assert ids == ["emb__fp32__s0", "emb__rtn-w8a16__s0", "emb__zsaq-w4a8__s0", "emb__zsaq-w4a8__s1"]
    shell(f"{bench} --list-cells | xargs -P 2 -I{{}} {bench} --out {spread} --cell {{}}")
    assert sorted(p.name for p in spread.iterdir()) == ["cells"]  # workers write cells, not the table
    shell(f"{bench} --out {spread} --render-only")

    timed = ("minutes", "peak_gib", "minutes_mean")  # what differs between runs of the same cell

    def untimed(record: dict) -> dict:  # the learning record's own minutes too (a game's, nested)
        kept = {k: v for k, v in record.items() if k not in timed and not k.endswith("_minutes")}
        return {k: untimed(v) if isinstance(v, dict) else v for k, v in kept.items()}

    def cells(out: Path) -> dict[str, dict]:
        return {p.name: untimed(json.loads(p.read_text())) for p in (out / "cells").iterdir()}

    assert cells(spread) == cells(serial) and sorted(cells(serial)) == [f"{i}.json" for i in ids]
    assert len({cell["fidelity"] for cell in cells(serial).values()}) == 4  # the comparison tells each cell apart

    def table(out: Path) -> list[dict]:
        with open(out / "table.csv", encoding="utf-8") as handle:
            return [{k: v for k, v in r.items() if k not in timed} for r in csv.DictReader(handle)]

    assert table(spread) == table(serial) and len(table(serial)) == 3


def test_peer_rows_quantize_the_fp32_graph_with_their_own_tools(bench_files, monkeypatch, tmp_path):
    """quantize_static (MinMax and Entropy on random tokens) scores its own QDQ graph; a peer that cannot run here
    (ModelOpt without its environment) fails its cell in one line saying how to install it."""
    spec = load_spec(bench_files / "spec.yaml")
    task = spec.tasks[0]
    config = task_config(spec, task, row_patch(ROWS["ort-static-minmax"], 0, None))
    teacher = frozen_teacher(load_backbone(config.model, config.task), config.task.kind)
    tokenizer = load_source_tokenizer(config.model)
    inputs, _ = build_eval_inputs(config.task, config.validate, 0, tokenizer, teacher.backbone.config.vocab_size)
    fp32_metric, fp32_outputs = PROCEDURES["fp32"](config, teacher, tokenizer, inputs)
    for key in ("ort-static-minmax", "ort-static-entropy"):
        row_config = task_config(spec, task, row_patch(ROWS[key], 0, None))
        assert row_config.calib.method == "random-tokens"
        metric, outputs = PROCEDURES[key](row_config, teacher, tokenizer, inputs)
        assert 0.0 <= metric <= 100.0 and outputs.shape == fp32_outputs.shape
        assert not np.array_equal(outputs, fp32_outputs)  # quantized, so not the float function
        norms = np.linalg.norm(outputs, axis=-1) * np.linalg.norm(fp32_outputs, axis=-1)
        cosine = (outputs * fp32_outputs).sum(-1) / norms
        assert cosine.mean() > 0.9  # the same function, in int8
    assert ROWS["ort-static-entropy"].latency_format == ROWS["ort-static-minmax"].latency_format == "ort-static"
    monkeypatch.setenv(MODELOPT_PYTHON_ENV, str(tmp_path / "no-such-python"))
    modelopt = task_config(spec, task, row_patch(ROWS["modelopt-int8"], 0, None))
    with pytest.raises(click.ClickException, match=r"nvidia-modelopt is not installed \(its own environment: "):
        PROCEDURES["modelopt-int8"](modelopt, teacher, tokenizer, inputs)


def test_ort_static_graphs_are_per_channel_qdq_with_uint8_activations(tmp_path):
    teacher = tiny_teacher("bert")
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(teacher_export_model(teacher), fp32, 17)
    tokens = random_tokens(4, 16, teacher.backbone.config.vocab_size, seed=0)
    ort_static_graph(fp32, tmp_path / "static.onnx", sample_feeds(tokens), "minmax")
    graph = onnx.load(tmp_path / "static.onnx")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    constant_dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    per_channel = [n for n in constant_dq if inits[n.input[0]].dtype == np.int8 and inits[n.input[1]].ndim == 1]
    assert len(per_channel) >= 6  # every MatMul weight of the tiny BERT block, one scale per output channel
    activation_q = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_q and all(inits[n.input[2]].dtype == np.uint8 for n in activation_q)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_ort_int4_peers_are_matmul_nbits_in_the_rows_blocks_with_the_head_left_float(method, tmp_path):
    teacher = tiny_teacher("llama")
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(teacher_export_model(teacher), fp32, 17)
    ort_int4_graph(fp32, tmp_path / "int4.onnx", method, 32)
    graph = onnx.load(tmp_path / "int4.onnx")
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nbits]
    assert len(nbits) == 2 * 7  # q, k, v, o, gate, up, down of both blocks; the LM head stays a float MatMul
    assert all(a["bits"] == 4 and a["block_size"] == 32 for a in attributes)
    assert any(n.op_type == "MatMul" and "lm_head" in n.name for n in graph.graph.node)
    ids = random_tokens(2, 12, teacher.backbone.config.vocab_size, seed=0)
    got = run_full_sequence(ort_session(tmp_path / "int4.onnx"), ids.input_ids.numpy(), ids.attention_mask.numpy())
    with torch.no_grad():
        want = teacher(ids.input_ids, ids.attention_mask).numpy()
    assert fidelity(want, got, "causal-lm") > 80  # 4-bit weights: most next-token predictions kept
