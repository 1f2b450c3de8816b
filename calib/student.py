"""The quantized student: the FP teacher with fake quantizers (and Quadapters), and their initialisation."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from calib.config import QuantConfig
from calib.families import block_of
from calib.inputs import Batch
from calib.models import TaskModel
from calib.placement import insert_quantizers
from calib.quadapter import attach_quadapters, quadapter_groups
from calib.quant_attention import (
    KV_ROLES,
    ROLES,
    AttentionQuantizers,
    KVCacheQuantizers,
    RoleQuantizers,
    attach_attention_quantizers,
)
from calib.quant_linear import QuantEmbedding, QuantLinear
from calib.quantizers import DynamicBlockQuantizer, TensorQuantizer
from calib.range_init import RangeObserver
from calib.rotation import rotate
from calib.smoothing import SEARCH_ROWS, search_smoothing, smoothquant_scale

Batches = Iterable[Batch]


def build_student(teacher: TaskModel, quant: QuantConfig) -> TaskModel:
    """A deep copy of the teacher, rotated if ``quant.rotation`` says so (:mod:`calib.rotation`), with every
    block Linear swapped for a QuantLinear (plus Quadapters)."""
    student = copy.deepcopy(teacher)
    student.rotation_layout = rotate(student, quant.rotation) if quant.rotation.enabled else None
    names = insert_quantizers(student.backbone, quant)
    if quant.attention_matmuls or quant.kv_cache:
        attach_attention_quantizers(student.backbone, quant.attention_matmuls, quant.kv_cache)
    table_bits = quant.table_bits(teacher.kind)
    if table_bits is not None:
        for name in embedding_tables(student):
            parent, _, child = name.rpartition(".")
            owner = student.backbone.get_submodule(parent)
            setattr(owner, child, QuantEmbedding(getattr(owner, child), table_bits))
    student.quadapter_groups = []
    student.smoothing = {}
    if quant.quadapter.enabled:
        student.quadapter_groups = quadapter_groups(student.backbone, names, quant.quadapter.positions)
        attach_quadapters(student.backbone, student.quadapter_groups)
    for param in student.parameters():
        param.requires_grad_(False)
    return student


def embedding_tables(model: TaskModel) -> list[str]:
    """The embedding tables ``quant.embedding_bits`` quantizes: an encoder's every table (word, position, token
    type: together about half of MiniLM's file), a causal LM's word table only (its positions may be rotary)."""
    word = model.backbone.get_input_embeddings()
    return [
        name
        for name, module in model.backbone.named_modules()
        if isinstance(module, nn.Embedding) and (module is word or model.kind != "causal-lm")
    ]


def quant_layers(model: TaskModel) -> dict[str, QuantLinear]:
    """The student's quantized layers by qualified name (relative to the backbone)."""
    return {n: m for n, m in model.backbone.named_modules() if isinstance(m, QuantLinear)}


def freeze_weights(student: TaskModel) -> TaskModel:
    """Freeze every quantized layer's weight (:meth:`QuantLinear.freeze_weight`) in place, for inference."""
    for layer in quant_layers(student).values():
        layer.freeze_weight()
    return student


def quant_layers_by_block(model: TaskModel) -> dict[str | None, dict[str, QuantLinear]]:
    """:func:`quant_layers` grouped by transformer block, in model order (None: layers outside the blocks)."""
    blocks: dict[str | None, dict[str, QuantLinear]] = {}
    for name, layer in quant_layers(model).items():
        blocks.setdefault(block_of(name), {})[name] = layer
    return blocks


def _role_groups(model: TaskModel, kind: type[RoleQuantizers]) -> dict[str, RoleQuantizers]:
    """The quantizer groups of one kind by the name of the attention module holding them."""
    return {n.rpartition(".")[0]: m for n, m in model.backbone.named_modules() if isinstance(m, kind)}


def attention_quantizers(model: TaskModel) -> dict[str, AttentionQuantizers]:
    """The attention modules' matmul-input quantizers by attention module name (empty when switched off)."""
    return _role_groups(model, AttentionQuantizers)


def kv_cache_quantizers(model: TaskModel) -> dict[str, KVCacheQuantizers]:
    """The attention modules' cache quantizers by attention module name (empty when switched off)."""
    return _role_groups(model, KVCacheQuantizers)


def activation_quantizers(model: TaskModel) -> list[TensorQuantizer]:
    """Every per-tensor activation quantizer once (Q, K and V share theirs): layer inputs, then attention matmul
    inputs (the per-head cache quantizers: :func:`kv_cache_quantizers`)."""
    found = {id(layer.input_quantizer): layer.input_quantizer for layer in quant_layers(model).values()}
    for group in attention_quantizers(model).values():
        found.update({id(q): q for q in (group.quantizer(role) for role in ROLES)})
    return [q for q in found.values() if q is not None]


def _cache_quantizers(model: TaskModel) -> list[TensorQuantizer]:
    return [group.quantizer(role) for group in kv_cache_quantizers(model).values() for role in KV_ROLES]


def quadapter_owners(model: TaskModel) -> dict[int, list[QuantLinear]]:
    """Layers grouped by the Quadapter they share (keyed by its id)."""
    owners: dict[int, list[QuantLinear]] = {}
    for layer in quant_layers(model).values():
        if layer.quadapter is not None:
            owners.setdefault(id(layer.quadapter), []).append(layer)
    return owners


@contextmanager
def quantizers_off(model: TaskModel) -> Iterator[None]:
    """Every quantizer passes its tensor through in float inside the block: the student's float function."""
    quantizers = [m for m in model.modules() if isinstance(m, (TensorQuantizer, DynamicBlockQuantizer))]
    states = [q.enabled for q in quantizers]
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for q, state in zip(quantizers, states):
            q.enabled = state


@torch.no_grad()
def _float_inputs(
    student: TaskModel, layers: list[QuantLinear], batches: list[Batch], rows: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, over the batches of the student run in float: the per-input-channel max |x| of its (undivided)
    input, and about ``rows`` of its input rows drawn at the same seeded positions for every layer."""
    total = sum(batch.attention_mask.numel() for batch in batches)
    generator = torch.Generator().manual_seed(0)
    maxima = [torch.zeros(layer.in_features, device=layer.weight.device) for layer in layers]
    kept: list[list[torch.Tensor]] = [[] for _ in layers]
    picked = torch.empty(0, dtype=torch.long)

    def hook(index: int):
        def record(_module, args) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            maxima[index] = torch.maximum(maxima[index], x.abs().amax(dim=0))
            kept[index].append(x[picked.to(x.device)])

        return record

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with quantizers_off(student):
            for batch in batches:
                size = batch.attention_mask.numel()
                picked = torch.randperm(size, generator=generator)[: round(rows * size / total)]
                batch.run(student)
    finally:
        for handle in handles:
            handle.remove()
    return [(m, torch.cat(k)) for m, k in zip(maxima, kept)]


def _init_quadapters(student: TaskModel, quant: QuantConfig, batches: list[Batch]) -> None:
    """SmoothQuant scales at ``quadapter.alpha``, or (``smoothquant-search``) each group's best alpha, recorded
    in ``student.smoothing`` (first layer -> alpha, None: no smoothing was best)."""
    owners = quadapter_owners(student)
    search = quant.quadapter.init == "smoothquant-search"
    groups = list(owners.values())
    inputs = _float_inputs(student, [g[0] for g in groups], batches, SEARCH_ROWS if search else 0)
    names = {id(layer): name for name, layer in quant_layers(student).items()}
    for group, (absmax, rows) in zip(groups, inputs):
        if search:
            student.smoothing[names[id(group[0])]] = search_smoothing(group, rows, quant)
        else:
            group[0].quadapter.scale.copy_(smoothquant_scale(group, absmax, quant.quadapter.alpha))


@torch.no_grad()
def init_ranges(student: TaskModel, quant: QuantConfig, batches: Batches) -> None:
    """Quadapter scales (SmoothQuant) first, then weights from themselves, then activations from the batches."""
    batches = list(batches)
    layers = quant_layers(student)
    if quadapter_owners(student) and quant.quadapter.init != "ones":
        _init_quadapters(student, quant, batches)
    for layer in layers.values():
        layer.weight_quantizer.init_from_tensor(layer.effective_weight(), quant.weights.init)
    activations = activation_quantizers(student)
    for q in activations:
        q.observer = RangeObserver(quant.activations.init, quant.activations.percentile)
    cache = _cache_quantizers(student)
    for q in cache:  # per key/value head ([batch, heads, seq, dim]), min-max
        q.observer = RangeObserver("minmax", channel_axis=1)
    for batch in batches:
        batch.run(student)
    for q in activations:
        bound = q.observer.result(q.qmin, q.qmax)
        q.observer = None
        q.init_scale(bound)
    for q in cache:
        bound = q.observer.result(q.qmin, q.qmax)
        q.observer = None
        q.init_scale(bound.reshape(1, -1, 1, 1))


def _attention_groups(student: TaskModel) -> dict[str, dict[str, RoleQuantizers]]:
    """Both kinds of attention quantizer groups, by the attribute an attention module holds them in."""
    return {"attn_quantizers": attention_quantizers(student), "kv_quantizers": kv_cache_quantizers(student)}


def student_state(student: TaskModel, include_weights: bool) -> dict[str, torch.Tensor]:
    """The learned part of the student: step sizes (and zero points), Quadapter scales and (after QAT) the
    weights."""
    state = {}
    for name, layer in quant_layers(student).items():
        for part in ("weight_quantizer", "input_quantizer"):
            quantizer = getattr(layer, part)
            if quantizer is not None:
                state[f"{name}.{part}.scale"] = quantizer.scale.detach().clone()
                if quantizer.zero_point is not None:
                    state[f"{name}.{part}.zero_point"] = quantizer.zero_point.clone()
        if layer.quadapter is not None:
            state[f"{name}.quadapter.scale"] = layer.quadapter.scale.detach().clone()
        if include_weights:
            state[f"{name}.weight"] = layer.weight.detach().clone()
    for attribute, groups in _attention_groups(student).items():
        for name, group in groups.items():
            for role in group.roles:
                state[f"{name}.{attribute}.{role}.scale"] = group.quantizer(role).scale.detach().clone()
    return state


@torch.no_grad()
def load_student_state(student: TaskModel, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`student_state` (quantizer scales take their saved shapes)."""
    layers = quant_layers(student)
    groups = {f".{attribute}.": found for attribute, found in _attention_groups(student).items()}
    for key, value in state.items():
        owner = next((o for o in groups if o in key), None)
        if owner is not None:
            name, _, rest = key.partition(owner)
            groups[owner][name].quantizer(rest.removesuffix(".scale")).set_scale(value)
            continue
        name, _, part = key.rpartition(".")
        layer_name, _, owner = name.rpartition(".")
        if owner in ("weight_quantizer", "input_quantizer"):
            quantizer = getattr(layers[layer_name], owner)
            if part == "zero_point":
                quantizer.set_zero_point(value)
            else:
                quantizer.set_scale(value)
        elif owner == "quadapter":
            layers[layer_name].quadapter.scale.copy_(value)
        else:
            layers[name].weight.copy_(value)
