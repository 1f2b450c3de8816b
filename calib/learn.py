"""Quantizer learning: distil the teacher into the student on data-free inputs (LSQ step sizes)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from calib.block_calls import capture_block_call
from calib.config import LearnConfig
from calib.families import block_of
from calib.inputs import Batch
from calib.models import TaskModel, TaskOutput
from calib.parallel import SINGLE, Parallel, split_parts
from calib.quadapter import ChannelScale
from calib.quant_attention import ROLES
from calib.student import attention_quantizers, quant_layers, quant_layers_by_block

# A loss this many times the first one (or NaN/inf) counts as divergence.
DIVERGENCE_FACTOR = 100.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def output_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over output distributions; normalised MSE for embeddings and for a regression
    head (a classifier with one output: its softmax is constant, so a KL would carry no signal)."""
    if kind == "embedding" or teacher.shape[-1] == 1:
        return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp(min=1e-12)
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="none")
    kl = kl.sum(-1)
    return _masked_mean(kl, mask) if kind == "causal-lm" else kl.mean()


def hidden_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], mask: torch.Tensor
) -> torch.Tensor:
    """Mean over the given layers of the masked MSE, each normalised by the teacher's mean square."""
    terms = []
    for s, t in zip(student, teacher):
        err = _masked_mean((s - t).pow(2), mask)
        terms.append(err / _masked_mean(t.pow(2), mask).clamp(min=1e-12))
    return torch.stack(terms).mean()


def distillation_loss(
    kind: str, student: TaskOutput, teacher: TaskOutput, mask: torch.Tensor, config: LearnConfig
) -> torch.Tensor:
    """The configured weighted sum of output and hidden-state terms."""
    loss = config.kl_weight * output_loss(kind, student.output, teacher.output, mask)
    if config.hidden_mse_weight and student.hidden_states is not None:
        loss = loss + config.hidden_mse_weight * hidden_loss(
            student.hidden_states[1:],
            teacher.hidden_states[1:],
            mask,  # [0] is the float embedding output
        )
    return loss


def sample_losses(
    kind: str, student: TaskOutput, teacher: TaskOutput, mask: torch.Tensor, config: LearnConfig
) -> torch.Tensor:
    """:func:`distillation_loss` of each sample on its own: ``[batch]``."""

    def row(output: TaskOutput, i: int) -> TaskOutput:
        hidden = None if output.hidden_states is None else tuple(h[i : i + 1] for h in output.hidden_states)
        return TaskOutput(output.output[i : i + 1], hidden)

    return torch.stack(
        [distillation_loss(kind, row(student, i), row(teacher, i), mask[i : i + 1], config) for i in range(len(mask))]
    )


def learnable_parameters(
    student: TaskModel, which: tuple[str, ...], layer_names: list[str] | None = None
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Switch on gradients for what ``which`` names (step-sizes, quadapter, weights), optionally only in
    ``layer_names``; returns (positive parameters to keep above zero, unconstrained parameters)."""
    positive: dict[int, torch.nn.Parameter] = {}
    free: list[torch.nn.Parameter] = []
    for name, layer in quant_layers(student).items():
        if layer_names is not None and name not in layer_names:
            continue
        if "step-sizes" in which:
            for quantizer in (layer.weight_quantizer, layer.input_quantizer):
                if quantizer is not None:
                    positive[id(quantizer.scale)] = quantizer.scale
        if "quadapter" in which and isinstance(layer.quadapter, ChannelScale):
            positive[id(layer.quadapter.scale)] = layer.quadapter.scale
        if "weights" in which:
            free.append(layer.weight)
    if "step-sizes" in which:
        blocks = None if layer_names is None else {block_of(name) for name in layer_names}
        for name, group in attention_quantizers(student).items():
            if blocks is None or block_of(name) in blocks:
                positive.update({id(group.quantizer(r).scale): group.quantizer(r).scale for r in ROLES})
    for param in [*positive.values(), *free]:
        param.requires_grad_(True)
    return list(positive.values()), free


def relative_adamw(
    positive: list[torch.nn.Parameter], free: list[torch.nn.Parameter], config: LearnConfig
) -> torch.optim.AdamW:
    """AdamW with each tensor's learning rate relative to its own magnitude.

    Adam's steps are about ``lr`` in absolute size whatever the gradient's, so ``lr`` here means "fraction
    per step" for a 1e-4 step size and a 1.0 Quadapter scale alike; the weights (``free``) take
    ``config.weights_lr`` when it is set.
    """
    weights_lr = config.lr if config.weights_lr is None else config.weights_lr
    rated = [(p, config.lr) for p in positive] + [(p, weights_lr) for p in free]
    groups = [{"params": [p], "lr": lr * float(p.detach().abs().mean().clamp(min=1e-12))} for p, lr in rated]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def clamp_positive(params: list[torch.nn.Parameter]) -> None:
    """Keep step sizes and Quadapter scales strictly positive after an update."""
    with torch.no_grad():
        for p in params:
            p.clamp_(min=1e-8)


@dataclass
class LearnResult:
    """Loss history and whether learning stopped early."""

    losses: list[float] = field(default_factory=list)
    stopped_early: str | None = None


LossFn = Callable[[Batch], torch.Tensor]


def split_batches(batches: list[Batch], parallel: Parallel) -> list[list[Batch]]:
    """Each batch cut into one part per sample stream (fewer for a short batch): the loss of a step is the
    mean of its parts' losses, and each rank computes the parts it owns (:mod:`calib.parallel`)."""
    return [[batch.rows(part) for part in split_parts(len(batch), parallel.streams)] for batch in batches]


def _optimize(
    positive: list[torch.nn.Parameter],
    free: list[torch.nn.Parameter],
    loss_fn: LossFn,
    batches: list[list[Batch]],
    steps: int,
    config: LearnConfig,
    result: LearnResult,
    description: str,
    show_progress: bool,
    parallel: Parallel,
) -> bool:
    """AdamW + cosine schedule; False when learning had to stop (NaN or divergence: last good state kept)."""
    params = [*positive, *free]
    optimizer = relative_adamw(positive, free, config)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    good_state = [p.detach().clone() for p in params]
    first = None

    def loss_and_gradients(parts: list[Batch]) -> torch.Tensor:
        total = torch.zeros((), device=params[0].device)
        for index in parallel.owned_parts(len(parts)):
            loss = loss_fn(parts[index]) / len(parts)
            loss.backward()
            total = total + loss.detach()
        return parallel.reduce_gradients(params, total)

    progress = tqdm(range(steps), desc=description, disable=not show_progress)
    for step in progress:
        optimizer.zero_grad(set_to_none=True)
        # the divergence check needs the value on the host: the one copy per step of this loop
        value = loss_and_gradients(batches[step % len(batches)]).item()
        first = value if first is None else first
        if not math.isfinite(value) or value > DIVERGENCE_FACTOR * max(first, 1e-12):
            with torch.no_grad():
                for p, saved in zip(params, good_state):
                    p.copy_(saved)
            result.stopped_early = f"{description}: loss became {value:.4g} at step {step}; kept the last good state"
            progress.write(result.stopped_early)
            return False
        good_state = [p.detach().clone() for p in params]  # these parameters gave a finite loss
        optimizer.step()
        schedule.step()
        clamp_positive(positive)
        result.losses.append(value)
        progress.set_postfix(loss=f"{value:.5f}")
    return True


def learn_quantizers(
    teacher: TaskModel,
    student: TaskModel,
    batches: list[Batch],
    config: LearnConfig,
    show_progress: bool = True,
    parallel: Parallel = SINGLE,
) -> LearnResult:
    """Distil the teacher into the student for ``config.steps`` steps, cycling through ``batches`` (data
    parallel over the ranks of ``parallel``).

    ``end-to-end``: every learnable parameter at once on the output (+ hidden-state) loss.
    ``block-wise``: block by block in order, each on its own output's MSE (``steps`` split evenly), one
    block's activations in memory at a time (:func:`_learn_block_by_block`).
    """
    result = LearnResult()
    if config.steps == 0:
        return result
    want_hidden = config.hidden_mse_weight > 0
    teacher_cache: dict[int, TaskOutput] = {}
    parts = split_batches(batches, parallel)

    def teacher_out(batch: Batch) -> TaskOutput:
        key = id(batch)  # batches are fixed: the teacher's outputs are computed once each
        if key not in teacher_cache:
            with torch.no_grad():
                teacher_cache[key] = batch.run(teacher, output_hidden_states=want_hidden)
        return teacher_cache[key]

    try:
        if config.mode == "end-to-end":
            positive, free = learnable_parameters(student, config.params)

            def loss_fn(batch: Batch) -> torch.Tensor:
                out = batch.run(student, output_hidden_states=want_hidden)
                return distillation_loss(teacher.kind, out, teacher_out(batch), batch.attention_mask, config)

            _optimize(
                positive, free, loss_fn, parts, config.steps, config, result, "quantize: learning", show_progress,
                parallel,
            )  # fmt: skip
            return result
        _learn_block_by_block(teacher, student, parts, config, result, show_progress, parallel)
        return result
    finally:
        for param in student.parameters():
            param.requires_grad_(False)


def _learn_block_by_block(
    teacher: TaskModel,
    student: TaskModel,
    parts: list[list[Batch]],
    config: LearnConfig,
    result: LearnResult,
    show_progress: bool,
    parallel: Parallel,
) -> None:
    """Each block learns to map the inputs the (already learned) student blocks before it produce onto the
    teacher block's output for the teacher's own inputs, with only that block run per step: the inputs of
    every batch part are cached at the block's entry (float, ``[batch, seq, hidden]`` each), so memory holds
    one block's graph, not the whole model's. Layers outside the blocks (an LM head) keep their initial ranges.
    Each rank caches only the parts it computes."""
    blocks = {block: list(layers) for block, layers in quant_layers_by_block(student).items() if block is not None}
    if not blocks:
        return
    first, last = next(iter(blocks)), list(blocks)[-1]
    owned = [batch_parts[i] for batch_parts in parts for i in parallel.owned_parts(len(batch_parts))]
    student_calls = {id(part): capture_block_call(student, first, part) for part in owned}
    teacher_calls = {id(part): capture_block_call(teacher, first, part) for part in owned}
    student_inputs = {key: call.hidden for key, call in student_calls.items()}
    teacher_inputs = {key: call.hidden for key, call in teacher_calls.items()}
    per_block = max(1, config.steps // len(blocks))
    for block, names in blocks.items():
        teacher_block = teacher.backbone.get_submodule(block)
        student_block = student.backbone.get_submodule(block)
        with torch.no_grad():
            targets = {key: teacher_calls[key].run(teacher_block, teacher_inputs[key]) for key in teacher_calls}
            # a rotated student's blocks work in the rotated residual stream: its targets are rotated too
            rotated = {key: student.to_residual_stream(target) for key, target in targets.items()}
        positive, free = learnable_parameters(student, config.params, names)

        def block_loss(
            part: Batch, block_module: torch.nn.Module = student_block, inputs: dict = student_inputs,
            block_targets: dict = rotated,
        ) -> torch.Tensor:  # fmt: skip
            key = id(part)
            out = student_calls[key].run(block_module, inputs[key])
            return hidden_loss((out,), (block_targets[key],), part.attention_mask)

        ok = _optimize(
            positive, free, block_loss, parts, per_block, config, result, f"quantize: {block}", show_progress,
            parallel,
        )  # fmt: skip
        for param in [*positive, *free]:
            param.requires_grad_(False)
        if not ok or block == last:
            return
        with torch.no_grad():  # the next block's inputs: this block's outputs, learned student and teacher
            student_inputs = {key: student_calls[key].run(student_block, x) for key, x in student_inputs.items()}
        teacher_inputs = targets
