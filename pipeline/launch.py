"""``zsaq-pipeline run --nproc N``: start N ranks of one data-parallel run on this machine (what ``torchrun
--nproc-per-node N`` does, with the pipeline's own failure handling), and the process-group set-up each rank
does, whichever launcher started it.

Failure handling: when a rank fails, the others are stopped and the run exits non-zero with one line. Rank 0
usually notices first (its collective call fails) and says so itself; if it has not within a grace period,
the launcher stops it and says which rank failed. The run folder is rank 0's, written through temporary names
as always, so ``--resume`` continues it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from calib.devices import resolve_device
from calib.errors import PipelineError
from calib.parallel import Parallel, check_divides
from calib.registry import METHODS
from pipeline.config import PipelineConfig

GRACE_SECONDS = 10.0  # how long rank 0 gets to report another rank's failure itself
POLL_SECONDS = 0.2
COLLECTIVE_TIMEOUT = timedelta(minutes=60)  # a rank waits this long for rank 0 between stages
THREADS_AFTER = "ZSAQ_THREADS_AFTER_COLLECTIVES"  # rank 0's threads once it runs alone (set by launch)


def environment_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun or ``run --nproc`` set them; (0, 1, 0) outside a launcher."""
    return tuple(int(os.environ.get(name, default)) for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"),
                                                                          ("LOCAL_RANK", "0")))  # fmt: skip


def join_process_group(config: PipelineConfig) -> Parallel:
    """This process's place in the run the environment describes (torchrun's or ``--nproc``'s variables;
    one process without them), with ``calib.streams`` sample streams (None: one per process); NCCL when the
    ranks calibrate on GPUs, gloo otherwise."""
    rank, world, local_rank = environment_ranks()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if resolve_device(config.calib.device, local_rank).type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    return _place(config, rank, world, local_rank)


def leave_process_group() -> None:
    """Tear the process group down before the process exits. Left to the interpreter's exit, gloo's threads
    were sometimes destroyed still running, and a rank that had finished its work died by SIGABRT ("terminate
    called without an active exception"), which the launcher reports as a failed run."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _place(config: PipelineConfig, rank: int, world: int, local_rank: int = 0) -> Parallel:
    """Rank ``rank`` of ``world`` with the configured stream count (None: one per process); a stream count
    that does not split over the processes is a one-line error."""
    return Parallel(rank, world, config.calib.streams or world, local_rank)


def check_parallel_config(config: PipelineConfig, processes: int) -> None:
    """Before anything starts: the sample streams split over ``processes`` and the generator batch over them."""
    streams = _place(config, 0, processes).streams
    if METHODS[config.calib.method].trains_student:
        check_divides(config.calib.generator.batch_size, streams, "calib.generator.batch_size")


def without_nproc(arguments: list[str]) -> list[str]:
    """The command line minus ``--nproc N`` / ``--nproc=N``: what each rank runs."""
    out, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            out.append(argument)
    return out


def restore_threads() -> None:
    """Rank 0, alone after the collective stages: the threads ``launch`` split among the ranks, back."""
    if os.environ.get(THREADS_AFTER):
        import torch

        torch.set_num_threads(int(os.environ[THREADS_AFTER]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def launch(arguments: list[str], nproc: int) -> int:
    """Run ``zsaq-pipeline <arguments>`` as ``nproc`` ranks; returns the exit status for the whole run.

    Rank 0 keeps the terminal (its progress and messages); the other ranks' output goes to log files that
    are named when one of them fails. Each rank gets ``cores // nproc`` threads unless OMP_NUM_THREADS is set:
    ranks that spin on the same cores slow each other down many times over."""
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc)}  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="zsaq-ranks-"))
    processes: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = {**os.environ, **base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        if "OMP_NUM_THREADS" not in env:  # the split is ours: rank 0 takes every core back when it runs alone
            env.update(OMP_NUM_THREADS=threads, **{THREADS_AFTER: str(os.cpu_count() or 1)})
        output = None if rank == 0 else (logs / f"rank{rank}.log").open("w", encoding="utf-8")
        command = [sys.executable, "-m", "pipeline.cli", *arguments]
        processes.append(subprocess.Popen(command, env=env, stdout=output, stderr=output))
    try:
        return _watch(processes, logs)
    except KeyboardInterrupt:
        _stop(processes)
        raise


def _watch(processes: list[subprocess.Popen], logs: Path) -> int:
    """Wait for every rank; on the first failure stop the others and return a non-zero status."""
    while True:
        codes = [p.poll() for p in processes]
        if all(code == 0 for code in codes):
            return 0
        failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None:
            break
        time.sleep(POLL_SECONDS)
    if failed != 0:  # give rank 0 the chance to notice and report it itself
        deadline = time.monotonic() + GRACE_SECONDS
        while processes[0].poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
    rank0 = processes[0].poll()
    _stop(processes)
    if failed == 0 or rank0 not in (None, 0):
        return processes[0].returncode or 1  # rank 0 has said what happened
    detail = _last_line(logs / f"rank{failed}.log")
    raise PipelineError(
        f"run: rank {failed} of {len(processes)} {_describe_exit(processes[failed].returncode)}"
        + (f" ({detail})" if detail else "")
        + f"; the other ranks were stopped and the run folder kept: continue with --resume (rank logs: {logs})"
    )


def _stop(processes: list[subprocess.Popen]) -> None:
    """Terminate every rank still running, then kill what has not gone within a few seconds."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 5.0
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
