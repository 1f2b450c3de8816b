"""Data parallelism for the calibration and quantizer-learning loops, on torch.distributed (gloo on CPU, NCCL
on GPUs), launched by ``torchrun`` or ``zsaq-pipeline run --nproc N``.

The global batch of every step is drawn as ``streams`` independent sample streams (stream ``s`` has its own
random generator, seeded from the run seed and ``s``), and the objective is the mean over streams of each
stream's loss. A rank owns streams ``rank, rank + world, ...``: it backpropagates its streams' share, and one
all-reduce per backward pass sums gradients and loss values over ranks. The numbers therefore depend on the
stream count, not on how many processes share the streams: one process with 2 streams and two processes with
one stream each compute the same student (within float summation order). With one stream the loops are
exactly the single-process loops of before."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from calib.errors import ConfigError, PipelineError


def _collective(call: Callable[[], None]) -> None:
    """A collective call; a rank that stopped makes it fail with one line instead of a gloo traceback."""
    try:
        call()
    except RuntimeError as exc:  # DistBackendError and gloo's connection errors
        # gloo says "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:8117. This is typically ...": the
        # middle part is the story
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().split("\n")[0]).split(". ")[0] or type(exc).__name__
        raise PipelineError(
            f"another process of this data-parallel run stopped ({detail[:120]}); the run folder is kept: "
            "continue with --resume"
        ) from exc


@dataclass(frozen=True)
class Parallel:
    """Where this process sits: its rank among ``world_size`` processes, and the number of sample streams."""

    rank: int = 0
    world_size: int = 1
    streams: int = 1
    local_rank: int = 0  # among the processes of this machine: which GPU it takes

    def __post_init__(self) -> None:
        if self.streams % self.world_size:
            raise ConfigError(
                f"calib.streams: expected a multiple of the {self.world_size} processes, got {self.streams}"
            )

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes artifacts."""
        return self.rank == 0

    @property
    def local_streams(self) -> range:
        """The streams this rank computes."""
        return range(self.rank, self.streams, self.world_size)

    def owned_parts(self, parts: int) -> range:
        """Of a batch split into ``parts`` pieces (one per stream, fewer for a short last batch), this rank's."""
        return range(self.rank, parts, self.world_size)

    def all_reduce_sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The element-wise sums over ranks, through one flat buffer (one collective per call)."""
        if self.world_size == 1:
            return list(tensors)
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        _collective(lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        out, start = [], 0
        for t in tensors:
            out.append(flat[start : start + t.numel()].view(t.shape).to(t.dtype))
            start += t.numel()
        return out

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum every parameter's ``.grad`` (missing ones count as zero) and ``loss`` over ranks, in place;
        returns the summed loss."""
        if self.world_size == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        *summed, total = self.all_reduce_sum([*grads, loss.detach().reshape(1)])
        for param, grad in zip(params, summed):
            param.grad = grad
        return total.reshape(())

    def gather(self, value: object) -> list[object] | None:
        """Every rank's ``value`` on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [value]
        out: list[object] | None = [None] * self.world_size if self.is_main else None
        _collective(lambda: dist.gather_object(value, out, dst=0))
        return out

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        _collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]


SINGLE = Parallel()  # one process, one stream: the loops as they always were


def stream_seed(seed: int, stream: int) -> int:
    """Stream 0 keeps the run seed (one stream = the single-process loop); the others derive theirs."""
    if stream == 0:
        return seed
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]) >> 1


def split_parts(count: int, streams: int) -> list[range]:
    """Rows ``0..count`` in up to ``streams`` near-equal consecutive parts (none empty)."""
    parts = min(streams, count)
    edges = [round(i * count / parts) for i in range(parts + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(parts)]


def check_divides(batch_size: int, streams: int, key: str) -> None:
    """The generator's batch splits evenly over the streams."""
    if batch_size % streams:
        raise ConfigError(
            f"{key}: expected a multiple of the {streams} sample streams (calib.streams, by default one per "
            f"process), got {batch_size}"
        )
