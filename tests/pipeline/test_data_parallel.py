"""Data-parallel calibration: two gloo ranks learn the student one process learns over the same streams, a
killed rank stops the run with one line and leaves it resumable, bad stream settings fail before any start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from calib.config import CalibConfig, GeneratorConfig, LearnConfig, QuantConfig, SamSgaConfig, TaskConfig, WeightQuant
from calib.contract import build_contract
from calib.methods import CalibrationRequest, calibrate, quantize_student
from calib.parallel import Parallel, split_parts, stream_seed
from calib.student import student_state
from pipeline.launch import without_nproc
from tests.models import tiny_teacher

QUANT = QuantConfig(
    weights=WeightQuant(bits=4, granularity="per-group", group_size=32),
    learn=LearnConfig(steps=3, lr=1e-2, params=("step-sizes", "weights")),
)
CALIB = CalibConfig(
    method="zsaq", samples=12, seq_len=16, batch_size=6, streams=2,
    generator=GeneratorConfig(kind="soft-tokens", batch_size=4, min_len=4),
    sam_sga=SamSgaConfig(rounds=3),
)  # fmt: skip


def _learn(parallel: Parallel) -> dict[str, torch.Tensor]:
    """Calibrate (SAM-SGA) and quantize (learned steps and weights) a tiny Llama; the student's learned state."""
    torch.set_num_threads(1)
    teacher = tiny_teacher("llama")
    request = CalibrationRequest(teacher, None, CALIB, QUANT, TaskConfig(kind="causal-lm"), show_progress=False,
                                 parallel=parallel)  # fmt: skip
    calibration = calibrate(request)
    state = student_state(calibration.game.student, True)
    student, _ = quantize_student(teacher, QUANT, calibration.samples.batches(CALIB.batch_size), state, False, parallel)
    return {**{f"game.{k}": v for k, v in state.items()}, **build_contract(student).tensors}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        learned = _learn(Parallel(rank, world, streams=2))
        torch.save(learned, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_learn_the_student_one_process_learns_over_the_same_streams(tmp_path):
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    one = _learn(Parallel(0, 1, streams=2))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]) == set(one) and len(one) > 20
    for name, value in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the ranks never drift apart
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the streams are what the numbers depend on: one stream is another game
    single_stream = _learn(Parallel(0, 1, streams=1))
    assert any(not torch.equal(single_stream[k], one[k]) for k in one)


def test_streams_split_batches_and_keep_the_run_seed_for_stream_zero():
    assert [list(p) for p in split_parts(5, 2)] == [[0, 1], [2, 3, 4]]
    assert [len(p) for p in split_parts(1, 4)] == [1]  # a short batch: fewer parts, none empty
    assert stream_seed(7, 0) == 7 and stream_seed(7, 1) != stream_seed(7, 2) != 7
    assert list(Parallel(1, 2, streams=4).local_streams) == [1, 3]
    assert without_nproc(["run", "c.yaml", "--nproc", "2", "--quiet", "--nproc=3"]) == ["run", "c.yaml", "--quiet"]


@pytest.mark.parametrize(
    ("patch", "nproc", "message"),
    [
        ({"streams": 3}, "2", "calib.streams: expected a multiple of the 2 processes, got 3"),
        ({"generator": {"batch_size": 3}}, "2", "calib.generator.batch_size: expected a multiple of the 2 sample"),
    ],
)
def test_bad_parallel_settings_fail_in_one_line_before_any_process_starts(write_config, cli, tmp_path, patch, nproc,
                                                                         message):  # fmt: skip
    config = write_config({"calib": {"method": "zsaq", **patch}})
    result = cli("run", config, "--out", tmp_path / "run", "--nproc", nproc)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _config(tmp_path: Path, rounds: int) -> Path:
    config = {
        "model": {"random": {"family": "llama"}},
        "task": {"kind": "causal-lm"},
        "calib": {
            "method": "zsaq", "samples": 16, "seq_len": 16, "batch_size": 8, "streams": 2,
            "generator": {"kind": "soft-tokens", "batch_size": 4, "min_len": 4},
            "sam_sga": {"rounds": rounds, "checkpoint_every": 2},
        },
        "quant": {"weights": {"bits": 4, "granularity": "per-group", "group_size": 32}, "learn": {"steps": 4}},
        "validate": {"shapes": [[1, 16]], "repeats": 2, "warmup": 1, "samples": 8},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _zsaq(*arguments: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline.cli", *map(str, arguments)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _rank_pid(launcher: int, rank: int) -> int | None:
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank processes through /proc (Linux)")
def test_a_killed_rank_stops_the_run_in_one_line_and_resume_finishes_the_same_game(tmp_path):
    config, run = _config(tmp_path, rounds=40), tmp_path / "run"
    launcher = _zsaq("run", config, "--out", run, "--nproc", 2, "--quiet")
    checkpoints = run / ".ckpt-calibrate"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(checkpoints.glob("*.pt"))):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.2)
    os.kill(_rank_pid(launcher.pid, 1), signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert launcher.returncode != 0 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "continue with --resume" in lines[0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["calibrate"]["status"] == "failed" and not (run / "calibrate").exists()
    resumed = _zsaq("run", config, "--out", run, "--nproc", 2, "--resume", "--quiet")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    # the resumed game is the uninterrupted one, played by one process over the same two streams
    single = tmp_path / "single"
    one = _zsaq("run", config, "--out", single, "--quiet", env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert one.wait(timeout=600) == 0, one.communicate()[1]
    for artifact in ("calibrate/student_state.safetensors", "quantize/contract.safetensors"):
        a, b = load_file(run / artifact), load_file(single / artifact)
        assert set(a) == set(b)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{artifact}: {name}")
    summary = json.loads((run / "manifest.json").read_text())["stages"]["calibrate"]["summary"]
    assert summary["processes"] == 2 and summary["streams"] == 2
