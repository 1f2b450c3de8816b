"""Quantizer learning: distil the teacher into the student on data-free inputs (LSQ step sizes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from calib.models import TaskModel, TaskOutput
from calib.student import quant_layers
from pipeline.config import LearnConfig

# A loss this many times the first one (or NaN/inf) counts as divergence.
DIVERGENCE_FACTOR = 100.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def output_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over output distributions; normalised MSE for embeddings."""
    if kind == "embedding":
        return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp(min=1e-12)
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="none")
    kl = kl.sum(-1)
    return _masked_mean(kl, mask) if kind == "causal-lm" else kl.mean()


def hidden_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over layers of the masked MSE, each normalised by the teacher's mean square."""
    terms = []
    for s, t in zip(student[1:], teacher[1:]):
        err = _masked_mean((s - t).pow(2), mask)
        terms.append(err / _masked_mean(t.pow(2), mask).clamp(min=1e-12))
    return torch.stack(terms).mean()


def distillation_loss(
    kind: str, student: TaskOutput, teacher: TaskOutput, mask: torch.Tensor, config: LearnConfig
) -> torch.Tensor:
    """The configured weighted sum of output and hidden-state terms."""
    loss = config.kl_weight * output_loss(kind, student.output, teacher.output, mask)
    if config.hidden_mse_weight and student.hidden_states is not None:
        loss = loss + config.hidden_mse_weight * hidden_loss(student.hidden_states, teacher.hidden_states, mask)
    return loss


def learnable_parameters(student: TaskModel) -> list[torch.nn.Parameter]:
    """Turn on LSQ for every quantizer's step size; returns the parameters to optimise."""
    params = []
    for layer in quant_layers(student).values():
        for quantizer in (layer.weight_quantizer, layer.input_quantizer):
            if quantizer is not None:
                quantizer.set_learnable(True)
                params.append(quantizer.scale)
    return params


@dataclass
class LearnResult:
    """Loss history and whether learning stopped early."""

    losses: list[float] = field(default_factory=list)
    stopped_early: str | None = None


def learn_quantizers(
    teacher: TaskModel,
    student: TaskModel,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    config: LearnConfig,
    show_progress: bool = True,
) -> LearnResult:
    """AdamW + cosine schedule over ``config.steps`` steps, cycling through ``batches``.

    On a NaN or diverging loss the last good state is restored and learning stops with a reason.
    """
    result = LearnResult()
    params = learnable_parameters(student)
    if config.steps == 0 or not params:
        return result
    # Adam's steps are about lr in absolute size whatever the gradient's: each step size gets a learning rate
    # relative to its own magnitude, so that lr means "fraction per step" for a 1e-4 scale and a 1.0 scale alike.
    groups = [{"params": [p], "lr": config.lr * float(p.detach().abs().mean())} for p in params]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    want_hidden = config.hidden_mse_weight > 0
    good_state = [p.detach().clone() for p in params]
    progress = tqdm(range(config.steps), desc="quantize: learning step sizes", disable=not show_progress)
    for step in progress:
        input_ids, mask = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher.run(mask, input_ids=input_ids, output_hidden_states=want_hidden)
        loss = distillation_loss(
            teacher.kind, student.run(mask, input_ids=input_ids, output_hidden_states=want_hidden), target, mask, config
        )
        value = loss.item()
        if not math.isfinite(value) or (result.losses and value > DIVERGENCE_FACTOR * result.losses[0]):
            with torch.no_grad():
                for p, saved in zip(params, good_state):
                    p.copy_(saved)
            result.stopped_early = f"loss became {value:.4g} at step {step}: kept the last state with a finite loss"
            progress.write(f"quantize: {result.stopped_early}")
            break
        good_state = [p.detach().clone() for p in params]  # these parameters gave a finite loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(min=1e-8)
        result.losses.append(value)
        progress.set_postfix(loss=f"{value:.4f}")
    for p in params:
        p.requires_grad_(False)
    return result
