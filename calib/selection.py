"""Data-free model selection for SAM-SGA: the student's discrepancy on held-out generated samples, measured every
few rounds; the game ends on the student state that scored lowest (round 0, before any learning, included).

Learning on generated inputs can drift away from what the teacher does on real text (the generator ascends the
discrepancy wherever it is easiest to raise). Held-out samples drawn once from the generator's starting
distribution, never trained on, are the only validation set a data-free method has; keeping the best state on
them costs one no-grad student pass per check, and bounds the game below by its starting point."""

from __future__ import annotations

from collections.abc import Callable

import torch

from calib.inputs import Batch
from calib.models import TaskOutput

Discrepancy = Callable[[Batch, TaskOutput], torch.Tensor]


class BestStudent:
    """Scores the student on fixed held-out samples (their teacher outputs computed once) and keeps a copy of
    ``params`` whenever the score is the lowest so far; :meth:`restore` puts the best copy back."""

    def __init__(
        self, samples: list[Batch], teacher_outputs: list[TaskOutput], discrepancy: Discrepancy, params: list
    ) -> None:
        self.samples, self.teacher_outputs = samples, teacher_outputs
        self.discrepancy, self.params = discrepancy, params
        self.best_loss = float("inf")
        self.best_round = -1
        self.best: list[torch.Tensor] = []
        self.scores: list[tuple[int, float]] = []  # (round, held-out discrepancy) of every check

    @torch.no_grad()
    def check(self, round_: int) -> float:
        """Score the current student; keep it if it is the best so far. Returns the score."""
        total = sum(self.discrepancy(b, t) for b, t in zip(self.samples, self.teacher_outputs))
        loss = float(total) / len(self.samples)
        self.scores.append((round_, loss))
        if loss < self.best_loss:
            self.best_loss, self.best_round = loss, round_
            self.best = [p.detach().clone() for p in self.params]
        return loss

    @torch.no_grad()
    def restore(self) -> None:
        """Put the best state back into the student's parameters."""
        for param, value in zip(self.params, self.best):
            param.copy_(value)

    def state_dict(self) -> dict:
        """The best state and the scores so far (tensors, numbers and lists: loads with weights_only)."""
        return {"best_loss": self.best_loss, "best_round": self.best_round, "best": self.best, "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_round = state["best_loss"], state["best_round"]
        self.best = list(state["best"])
        self.scores = [tuple(score) for score in state["scores"]]
