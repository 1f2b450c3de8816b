"""Rotations of a pre-norm decoder folded into its weights (QuaRot, arXiv 2404.00456; SpinQuant, 2405.16406),
applied to the student's float copy before quantizers go in. In float the rotated model computes what the
teacher computes; quantized, each activation's outlier channels are spread over all channels.

1. The norms' scales (and LayerNorm's shift) fold into the linears that read them, leaving scale 1 / shift 0:
   only then does a norm commute with a rotation.
2. The residual stream is rotated by ``Q``: tables and writers' outputs ``@ Q``, readers' weights ``W @ Q``.
   ``Q`` is a randomised Hadamard reflected so that ``Q 1 = 1``: LayerNorm's mean is then unchanged too, so
   GPT-2's LayerNorms stay LayerNorms. A tied LM head is untied (the final norm's scale folds into the head,
   not into the table), and takes a bias where LayerNorm's shift leaves one.
3. Each attention head's values are rotated by one ``H``, undone in the output projection's columns: exact
   under grouped-query attention too, since every head that shares a key/value head undoes the same ``H``.
4. ``online``: the MLP's down projection computes ``(u H) (W H)^T`` with ``u H`` done at run time
   (:class:`calib.hadamard.OnlineHadamard`): its input, the widest and most outlier-prone, is rotated too.

The student keeps ``Q`` (:attr:`calib.models.TaskModel.residual_rotation`): word embeddings given to it are
rotated on the way in, hidden states rotated back on the way out, so generators and losses stay in the
teacher's space."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from calib.config import RotationConfig
from calib.errors import ConfigError
from calib.families import FamilySpec, family_of
from calib.hadamard import OnlineHadamard, random_orthogonal
from calib.models import TaskModel
from calib.quant_linear import linear_weight


@dataclass
class RotationLayout:
    """What a rotation changed in the model's structure, so an exporter can rebuild it from the teacher:
    an untied LM head (with a bias) and the layers computing an online Hadamard of their input."""

    untied_head: bool = False
    head_bias: bool = False
    online: list[str] = field(default_factory=list)


def _weight(layer: nn.Module) -> torch.Tensor:
    """``[out, in]`` float64 copy of a Linear or Conv1D weight (:func:`calib.quant_linear.linear_weight`)."""
    return linear_weight(layer).double()


def _set_weight(layer: nn.Module, w: torch.Tensor) -> None:
    w = w.t() if isinstance(layer, Conv1D) else w
    layer.weight.data = w.to(layer.weight.dtype).contiguous()


def _set_bias(layer: nn.Module, b: torch.Tensor) -> None:
    layer.bias.data = b.to(layer.bias.dtype).contiguous()


def _rotation_spec(model: TaskModel) -> FamilySpec:
    family = family_of(model.backbone)
    if family.rotation is None or model.kind != "causal-lm":
        raise ConfigError(
            f"quant.rotation: needs a pre-norm causal LM (llama, qwen2, gpt2), not a {family.name} {model.kind} model"
        )
    return family


def _blocks(backbone: nn.Module, block: str) -> dict[str, nn.Module]:
    """The numbered blocks by qualified name (``model.layers.3``)."""
    name, blocks = next(
        (n, m) for n, m in backbone.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1] == block
    )
    return {f"{name}.{i}": module for i, module in enumerate(blocks)}


def _fold_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """Readers compute ``(n * g + b) W^T`` as ``n (W diag g)^T + W b``; the norm is left with g = 1, b = 0."""
    scale = norm.weight.detach().double()
    shift = getattr(norm, "bias", None)
    for layer in readers:
        w = _weight(layer)
        if shift is not None:
            extra = w @ shift.detach().double()
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=layer.weight.dtype), requires_grad=False)
            _set_bias(layer, layer.bias.detach().double() + extra)
        _set_weight(layer, w * scale)
    norm.weight.data.fill_(1.0)
    if shift is not None:
        shift.data.zero_()


def untie_head(backbone: nn.Module, bias: bool) -> nn.Linear:
    """Give the LM head its own weight (and a zero bias if asked); the config no longer ties it."""
    old = backbone.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=bias, dtype=old.weight.dtype)
    head.weight = nn.Parameter(old.weight.detach().clone(), requires_grad=False)
    if bias:
        head.bias = nn.Parameter(torch.zeros(old.out_features, dtype=old.weight.dtype), requires_grad=False)
    backbone.lm_head = head
    backbone.config.tie_word_embeddings = False
    return head


def mean_preserving(q: torch.Tensor) -> torch.Tensor:
    """``F q`` with ``F`` the reflection taking ``q u`` to ``u = 1 / sqrt(n)``: still orthogonal, and it maps
    the all-ones vector to itself, so LayerNorm's mean subtraction commutes with it."""
    n = q.shape[0]
    u = torch.full((n,), n**-0.5, dtype=q.dtype)
    v = q @ u
    w = v - u
    if float(w.norm()) < 1e-12:
        return q
    reflection = torch.eye(n, dtype=q.dtype) - 2 * torch.outer(w, w) / (w @ w)
    return reflection @ q


def _heads(config) -> tuple[int, int]:
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return heads, getattr(config, "head_dim", None) or hidden // heads


@torch.no_grad()
def rotate(model: TaskModel, config: RotationConfig) -> RotationLayout:
    """Fold the rotations into ``model`` (a float causal LM, before quantizers) in place; returns what changed."""
    family = _rotation_spec(model)
    spec = family.rotation
    backbone = model.backbone
    named_blocks = _blocks(backbone, family.block)
    blocks = list(named_blocks.values())
    generator = torch.Generator().manual_seed(config.seed)
    hidden = backbone.get_submodule(spec.embeddings[0]).weight.shape[1]
    q = mean_preserving(random_orthogonal(hidden, generator))

    final_norm = backbone.get_submodule(spec.final_norm)
    shifted = getattr(final_norm, "bias", None) is not None and bool(final_norm.bias.abs().max() > 0)
    head = backbone.lm_head
    layout = RotationLayout(untied_head=True, head_bias=shifted or head.bias is not None)
    head = untie_head(backbone, layout.head_bias)
    for block in blocks:
        for norm, readers in spec.norm_readers:
            _fold_norm(block.get_submodule(norm), [block.get_submodule(r) for r in readers])
    model.final_norm_scale = final_norm.weight.detach().float().clone()
    if getattr(final_norm, "bias", None) is not None:
        model.final_norm_shift = final_norm.bias.detach().float().clone()
    _fold_norm(final_norm, [head])

    for name in spec.embeddings:
        table = backbone.get_submodule(name)
        table.weight.data = (table.weight.detach().double() @ q).to(table.weight.dtype)
    readers = [block.get_submodule(r) for block in blocks for _, names in spec.norm_readers for r in names]
    for layer in [*readers, head]:
        _set_weight(layer, _weight(layer) @ q)
    for block in blocks:
        for name in spec.writers:
            layer = block.get_submodule(name)
            _set_weight(layer, q.t() @ _weight(layer))
            if layer.bias is not None:
                _set_bias(layer, layer.bias.detach().double() @ q)

    heads, head_dim = _heads(backbone.config)
    per_head = random_orthogonal(head_dim, generator)
    for block in blocks:
        _rotate_heads(block, spec, backbone.config, per_head, heads)

    if config.online:
        for prefix, block in named_blocks.items():
            down = block.get_submodule(spec.down)
            down.input_rotation = OnlineHadamard(_weight(down).shape[1])
            _set_weight(down, _weight(down) @ down.input_rotation.matrix())
            down.register_forward_pre_hook(_rotate_input)  # the float layer's; a QuantLinear applies it itself
            layout.online.append(f"{prefix}.{spec.down}")
    model.residual_rotation = q.float()
    return layout


def _rotate_input(layer: nn.Module, args: tuple) -> tuple:
    return (layer.input_rotation(args[0]), *args[1:])


def _rotate_heads(block: nn.Module, spec, config, h: torch.Tensor, heads: int) -> None:
    """Values ``v_j H`` per key/value head (rows ``H^T W_j``, bias ``b_j H``); output columns ``W_o[:, j] H``."""
    value = block.get_submodule(spec.value)
    output = block.get_submodule(spec.output)
    d = h.shape[0]
    w = _weight(value)
    start, stop = spec.value_rows(config) if spec.value_rows else (0, w.shape[0])
    rows = w[start:stop].reshape(-1, d, w.shape[1])
    w[start:stop] = torch.einsum("ed,kdi->kei", h.t(), rows).reshape(stop - start, -1)
    _set_weight(value, w)
    if value.bias is not None:
        b = value.bias.detach().double()
        b[start:stop] = (b[start:stop].reshape(-1, d) @ h).reshape(-1)
        _set_bias(value, b)
    wo = _weight(output)
    cols = wo.reshape(wo.shape[0], heads, d)
    _set_weight(output, (cols @ h).reshape(wo.shape[0], -1))


def online_rotations(layout: dict | None) -> set[str]:
    """Names of the layers with an online Hadamard in a contract's rotation layout (its JSON)."""
    return set((layout or {}).get("online", []))
