"""The quantized student: the FP teacher with fake quantizers, and their range initialisation."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from calib.models import TaskModel
from calib.placement import insert_quantizers
from calib.quant_linear import QuantLinear
from calib.range_init import RangeObserver
from pipeline.config import QuantConfig


def build_student(teacher: TaskModel, quant: QuantConfig) -> TaskModel:
    """A deep copy of the teacher with every block Linear swapped for a QuantLinear."""
    student = copy.deepcopy(teacher)
    insert_quantizers(student.backbone, quant)
    for param in student.parameters():
        param.requires_grad_(False)
    return student


def quant_layers(model: TaskModel) -> dict[str, QuantLinear]:
    """The student's quantized layers by qualified name (relative to the backbone)."""
    return {n: m for n, m in model.backbone.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def init_ranges(
    student: TaskModel,
    quant: QuantConfig,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Weights from themselves; activations by observing the calibration batches (ids, mask)."""
    layers = quant_layers(student)
    for layer in layers.values():
        layer.weight_quantizer.init_from_tensor(layer.weight, quant.weights.init)
        if layer.input_quantizer is not None:
            layer.input_quantizer.observer = RangeObserver(quant.activations.init, quant.activations.percentile)
    for input_ids, attention_mask in batches:
        student.run(attention_mask, input_ids=input_ids)
    for layer in layers.values():
        q = layer.input_quantizer
        if q is not None:
            bound = q.observer.result(q.qmin, q.qmax)
            q.observer = None
            q.init_scale(bound)
