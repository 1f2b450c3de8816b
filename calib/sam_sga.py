"""SAM-SGA (ZSAQ, arXiv 2310.13315): a minimax game between a generator, which ascends the teacher-student
discrepancy, and the quantized student, which descends it with SAM (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from calib.config import CalibConfig, LearnConfig, PriorConfig
from calib.errors import PipelineError
from calib.inputs import AnchorSource, Batch
from calib.learn import clamp_positive, distillation_loss, learnable_parameters, relative_adamw, sample_losses
from calib.models import TaskModel, TaskOutput
from calib.parallel import SINGLE, Parallel, check_divides, stream_seed
from calib.sam import SAM
from calib.selection import BestStudent

HELD_OUT_STREAM = 1_000_003  # the held-out samples' random stream, apart from every training stream


@dataclass
class GameHistory:
    """Per-round losses (what the plot shows) and the seconds spent on sharpness-aware generation."""

    generator_discrepancy: list[float] = field(default_factory=list)
    student_discrepancy: list[float] = field(default_factory=list)
    prior: list[float] = field(default_factory=list)
    sharpness: list[float] = field(default_factory=list)
    sharpness_seconds: float = 0.0
    generator_seconds: float = 0.0
    student_seconds: float = 0.0
    held_out: list[list[float]] = field(default_factory=list)  # [round, discrepancy] of each selection check
    selected_round: int = -1  # the round whose student the game ended on (-1: the last, no selection)


def prior_loss(
    kind: str, teacher: TaskOutput, batch: Batch, table_stats: tuple[torch.Tensor, torch.Tensor], priors: PriorConfig
) -> torch.Tensor:
    """Plausibility terms the generator minimises (see :class:`calib.config.PriorConfig`)."""
    total = torch.zeros((), device=teacher.output.device)
    if kind != "embedding" and (priors.confidence or priors.balance):
        probs = F.softmax(teacher.output, dim=-1)
        if priors.confidence:
            total = total + priors.confidence * -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean()
        if priors.balance and kind == "classification":
            mean = probs.mean(0)
            total = total + priors.balance * (mean * (mean.clamp(min=1e-12) * len(mean)).log()).sum()
    if priors.embedding_stats and batch.inputs_embeds is not None:
        mean, std = table_stats
        valid = batch.inputs_embeds[batch.attention_mask.bool()]
        scale = std.pow(2).mean()
        gap = (valid.mean(0) - mean).pow(2).mean() + (valid.std(0) - std).pow(2).mean()
        total = total + priors.embedding_stats * gap / scale
    return total


class SamSga:
    """Holds both players, their optimisers and the history; :meth:`play` runs rounds. Under data
    parallelism (:mod:`calib.parallel`) each rank plays its own sample streams and the gradients of both
    players are summed over ranks, so every rank holds the same generator and student."""

    def __init__(
        self,
        teacher: TaskModel,
        student: TaskModel,
        generator: torch.nn.Module,
        calib: CalibConfig,
        learn: LearnConfig,
        rng: torch.Generator,
        parallel: Parallel = SINGLE,
        anchor: AnchorSource | None = None,
    ) -> None:
        self.teacher, self.student, self.generator = teacher, student, generator
        if calib.sam_sga.anchor and anchor is None:
            raise ValueError("calib.sam_sga.anchor needs the anchor inputs' source (anchor)")
        self.anchor = anchor if calib.sam_sga.anchor else None
        self.calib, self.learn, self.parallel = calib, learn, parallel
        check_divides(calib.generator.batch_size, parallel.streams, "calib.generator.batch_size")
        self.stream_batch = calib.generator.batch_size // parallel.streams
        # stream 0 continues ``rng`` (one stream is the single-process game); the others are seeded apart
        self.rngs = {
            s: rng if s == 0 else torch.Generator(rng.device).manual_seed(stream_seed(calib.seed, s))
            for s in parallel.local_streams
        }
        self.positive, self.free = learnable_parameters(student, learn.params)
        self.student_params = [*self.positive, *self.free]
        self.student_optimizer = relative_adamw(self.positive, self.free, learn)
        sga = calib.sam_sga
        self.student_schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.student_optimizer, T_max=sga.rounds * sga.student_steps)
            if sga.schedule == "cosine"
            else None
        )
        self.sam = SAM(self.student_params, self.student_optimizer, sga.rho, sga.adaptive) if sga.sam else None
        self.generator_params = [p for p in generator.parameters() if p.requires_grad]
        self.choice: torch.nn.Parameter | None = getattr(generator, "choice", None)
        self.pathwise = [p for p in self.generator_params if p is not self.choice]  # moved by the gradient
        groups = [{"params": self.pathwise}] if self.pathwise else []
        if self.choice is not None:
            groups.append({"params": [self.choice], "lr": calib.generator.choose})
        self.generator_optimizer = torch.optim.Adam(groups, lr=calib.generator.lr)
        table = teacher.backbone.get_input_embeddings().weight.detach()
        self.table_stats = (table.mean(0), table.std(0))
        self.want_hidden = learn.hidden_mse_weight > 0
        self.history = GameHistory()
        self.round = 0
        self.selection = self._held_out_selection() if sga.select_every else None

    @torch.no_grad()
    def _held_out_selection(self) -> BestStudent:
        """Held-out samples from the generator's starting distribution (their own random stream, the same on
        every rank) and their teacher outputs, for :class:`calib.selection.BestStudent`."""
        device = next(self.student.parameters()).device
        rng = torch.Generator(device).manual_seed(stream_seed(self.calib.seed, HELD_OUT_STREAM))
        count, size = self.calib.sam_sga.select_samples, self.calib.generator.batch_size
        samples = [self.generator.sample(min(size, count - i), rng) for i in range(0, count, size)]
        outputs = [batch.run(self.teacher, output_hidden_states=self.want_hidden) for batch in samples]
        return BestStudent(samples, outputs, self._discrepancy, self.student_params)

    def _discrepancy(
        self, batch: Batch, teacher_out: TaskOutput, student_out: TaskOutput | None = None
    ) -> torch.Tensor:
        """The student's distillation loss on ``batch`` (its output run here unless given)."""
        if student_out is None:
            student_out = batch.run(self.student, output_hidden_states=self.want_hidden)
        return distillation_loss(self.teacher.kind, student_out, teacher_out, batch.attention_mask, self.learn)

    def _sharpness_term(self, batch: Batch, teacher_out: TaskOutput, rng: torch.Generator) -> torch.Tensor:
        """1 - cos between the student gradients of this batch and of its neighbours in embedding space."""
        embeds = batch.inputs_embeds
        direction = torch.randn(embeds.shape, generator=rng, device=embeds.device)
        direction = F.normalize(direction, dim=-1) * embeds.norm(dim=-1, keepdim=True) * self.calib.sharpness.radius
        neighbour = Batch(batch.attention_mask, inputs_embeds=embeds + direction * batch.attention_mask.unsqueeze(-1))
        with torch.no_grad():
            neighbour_teacher = neighbour.run(self.teacher, output_hidden_states=self.want_hidden)
        grads = []
        for sample, target in ((batch, teacher_out), (neighbour, neighbour_teacher)):
            loss = self._discrepancy(sample, target)
            grads.append(
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, self.student_params, create_graph=True)])
            )
        return 1.0 - F.cosine_similarity(grads[0], grads[1], dim=0)

    def _choice_ascent(self, batch: Batch, student_out: TaskOutput, teacher_out: TaskOutput) -> torch.Tensor:
        """The discrete move's objective to minimise: the score-function (REINFORCE) estimate of minus the
        expected discrepancy over the choice, each drawn text's own discrepancy less the batch mean as baseline
        (zero gradient for texts not drawn)."""
        with torch.no_grad():
            losses = sample_losses(self.teacher.kind, student_out, teacher_out, batch.attention_mask, self.learn)
        advantage = losses - losses.mean()
        return -(self.generator.choice_log_prob(batch.source) * advantage.to(self.choice.device)).mean()

    def generator_step(self) -> torch.Tensor:
        """One ascent step: maximise the discrepancy, minimise the priors (and the sharpness term); a choosing
        generator also moves its choice of texts (:meth:`_choice_ascent`; alone it needs no backward pass through
        the models). Returns (discrepancy, prior, sharpness) averaged over the streams, still on the device."""
        started = time.perf_counter()
        streams = self.parallel.streams
        grads = [torch.zeros_like(p) for p in self.generator_params]
        totals = torch.zeros(3, device=grads[0].device)
        for rng in self.rngs.values():
            with torch.set_grad_enabled(bool(self.pathwise)):
                batch = self.generator.sample(self.stream_batch, rng)
                teacher_out = batch.run(self.teacher, output_hidden_states=self.want_hidden)
                student_out = batch.run(self.student, output_hidden_states=self.want_hidden)
                discrepancy = self._discrepancy(batch, teacher_out, student_out)
                prior = prior_loss(self.teacher.kind, teacher_out, batch, self.table_stats, self.calib.priors)
            objective = -discrepancy + prior if self.pathwise else torch.zeros((), device=totals.device)
            if self.choice is not None:
                objective = objective + self._choice_ascent(batch, student_out, teacher_out)
            sharpness = torch.zeros((), device=totals.device)
            if self.calib.sharpness.enabled:
                sharp_started = time.perf_counter()
                sharpness = self._sharpness_term(batch, teacher_out, rng)
                objective = objective + self.calib.sharpness.weight * sharpness
                self.history.sharpness_seconds += time.perf_counter() - sharp_started
            for total, grad in zip(grads, torch.autograd.grad(objective / streams, self.generator_params)):
                total += grad
            totals += torch.stack([discrepancy.detach(), prior.detach(), sharpness.detach()]) / streams
        *grads, totals = self.parallel.all_reduce_sum([*grads, totals])
        for param, grad in zip(self.generator_params, grads):
            param.grad = grad
        self.generator_optimizer.step()
        self.generator_optimizer.zero_grad(set_to_none=True)
        self.history.generator_seconds += time.perf_counter() - started
        return totals

    def _student_samples(self, rng: torch.Generator) -> list[tuple[Batch, float]]:
        """One stream's batches of a student step with their loss weights: the generator's, and with an anchor
        as many anchor inputs, weighted ``1 - anchor`` and ``anchor``."""
        batch = self.generator.sample(self.stream_batch, rng)
        if self.anchor is None:
            return [(batch, 1.0)]
        share = self.calib.sam_sga.anchor
        return [(batch, 1.0 - share), (self.anchor.sample(self.stream_batch, rng), share)]

    def student_step(self) -> torch.Tensor:
        """One descent step (SAM, or plain AdamW) on fresh, detached generator samples (and anchor inputs);
        returns the discrepancy averaged over the streams, still on the device."""
        started = time.perf_counter()
        streams = self.parallel.streams
        with torch.no_grad():
            samples = [
                (batch, weight, batch.run(self.teacher, output_hidden_states=self.want_hidden))
                for rng in self.rngs.values()
                for batch, weight in self._student_samples(rng)
            ]

        def closure() -> torch.Tensor:
            total = torch.zeros((), device=self.student_params[0].device)
            for batch, weight, teacher_out in samples:
                loss = self._discrepancy(batch, teacher_out) * weight / streams
                loss.backward()
                total = total + loss.detach()
            return self.parallel.reduce_gradients(self.student_params, total)

        if self.sam is not None:
            value = self.sam.step(closure)
        else:
            self.student_optimizer.zero_grad(set_to_none=True)
            value = closure()
            self.student_optimizer.step()
        clamp_positive(self.positive)
        if self.student_schedule is not None:
            self.student_schedule.step()
        self.history.student_seconds += time.perf_counter() - started
        return value

    def _record(self, generator_totals: list[torch.Tensor], student_losses: list[torch.Tensor]) -> None:
        """The round's losses into the history: one copy to the host per round, not per step."""
        student = torch.stack(student_losses).tolist()
        bad = next((v for v in student if not math.isfinite(v)), None)
        if bad is not None:
            raise PipelineError(
                f"calibrate: the discrepancy became {bad} in round {self.round}; "
                "lower quant.learn.lr or calib.generator.lr (the last checkpoint is kept for --resume)"
            )
        self.history.student_discrepancy.extend(student)
        for discrepancy, prior, sharpness in torch.stack(generator_totals).tolist() if generator_totals else []:
            self.history.generator_discrepancy.append(discrepancy)
            self.history.prior.append(prior)
            if self.calib.sharpness.enabled:
                self.history.sharpness.append(sharpness)

    def play(self, rounds: int, checkpoint: Callable[[], None] | None = None, show_progress: bool = True) -> None:
        """Run rounds from the current one up to ``rounds``; ``checkpoint`` is called every N rounds (on every
        rank: saving gathers the ranks' random states). With selection the student ends on its best state."""
        sga = self.calib.sam_sga
        progress = tqdm(range(self.round, rounds), desc="calibrate: SAM-SGA", initial=self.round, total=rounds,
                        disable=not show_progress)  # fmt: skip
        selection = self.selection
        if selection is not None and not selection.scores:
            selection.check(self.round)  # the starting point: the game never ends worse than it on these samples
        for _ in progress:
            self.generator.set_progress(self.round / max(rounds - 1, 1))
            steps = sga.generator_steps if sga.adversarial else 0
            generator_totals = [self.generator_step() for _ in range(steps)]
            student_losses = [self.student_step() for _ in range(sga.student_steps)]
            self._record(generator_totals, student_losses)
            self.round += 1
            if selection is not None and (self.round % sga.select_every == 0 or self.round == rounds):
                selection.check(self.round)
            postfix = {"student": f"{self.history.student_discrepancy[-1]:.4f}"}
            if self.history.generator_discrepancy:
                postfix["generator"] = f"{self.history.generator_discrepancy[-1]:.4f}"
            progress.set_postfix(postfix)
            if checkpoint is not None and self.round % sga.checkpoint_every == 0 and self.round < rounds:
                checkpoint()
        if selection is not None:
            selection.restore()
            self.history.held_out = [list(score) for score in selection.scores]
            self.history.selected_round = selection.best_round
        for param in self.student_params:
            param.requires_grad_(False)

    def state_dict(self) -> dict:
        """Everything a resumed game needs (tensors, numbers and lists only: loads with weights_only). Called
        on every rank: the random states of all streams are gathered on rank 0, the one that saves."""
        names = {id(p): n for n, p in self.student.named_parameters()}
        history = {k: v for k, v in vars(self.history).items()}
        gathered = self.parallel.gather({str(s): rng.get_state() for s, rng in self.rngs.items()})
        return {
            "round": self.round,
            "generator": self.generator.state_dict(),
            "student": {names[id(p)]: p.detach().clone() for p in self.student_params},
            "student_optimizer": self.student_optimizer.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "student_schedule": None if self.student_schedule is None else self.student_schedule.state_dict(),
            "rngs": None if gathered is None else {k: v for states in gathered for k, v in states.items()},
            "history": history,
            "selection": None if self.selection is None else self.selection.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (each rank takes its own streams' random states)."""
        self.round = state["round"]
        self.generator.load_state_dict(state["generator"])
        params = dict(self.student.named_parameters())
        with torch.no_grad():
            for name, value in state["student"].items():
                params[name].copy_(value)
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        if self.student_schedule is not None:
            self.student_schedule.load_state_dict(state["student_schedule"])
        for stream, rng in self.rngs.items():
            rng.set_state(state["rngs"][str(stream)])
        self.history = GameHistory(**state["history"])
        if self.selection is not None and state.get("selection") is not None:
            self.selection.load_state_dict(state["selection"])
