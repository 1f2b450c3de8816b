"""Quadapter (arXiv 2211.16912): learned per-channel scales around quantized linear layers.

A scale vector ``a`` divides the activation entering a group of quantized layers that share one input,
and multiplies their weights along the input dimension: ``(x / a) @ (W * a)^T = x @ W^T`` in float, but
quantization sees flatter activations. At export the division is folded away where that is exact:

* ``norm``: into the LayerNorm / RMSNorm that produces the input (pre-LN models: GPT-2 ``ln_1``/``ln_2``,
  Llama ``input_layernorm``/``post_attention_layernorm``), whose output feeds only these layers;
* ``rows``: into the output rows of the layer that produces it linearly (attention's V projection for the
  output projection, Llama's ``up_proj`` for ``down_proj``).

Post-LN models (BERT) use the LayerNorm output as the residual stream too, so folding there would change
the residual: with ``positions: all`` those groups keep an explicit ``Mul`` on the quantized branch; with
the default ``positions: foldable`` they get no Quadapter and the graph carries no extra op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from calib.quant_linear import QuantLinear


class ChannelScale(nn.Module):
    """One learnable positive scale ``a`` per input channel, shared by the layers of a group."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)

    def input_multiplier(self) -> torch.Tensor:
        """``1 / a``: what the layer's input is multiplied by."""
        return torch.reciprocal(self.scale)

    def weight_factor(self) -> torch.Tensor | None:
        """``a``: what the weight is multiplied by along its input axis."""
        return self.scale


class FixedMultiplier(nn.Module):
    """An unfoldable Quadapter as the export contract stores it: the input multiplier, weights already scaled."""

    def __init__(self, multiplier: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("multiplier", multiplier.detach().clone())

    def input_multiplier(self) -> torch.Tensor:
        """The stored ``1 / a``."""
        return self.multiplier

    def weight_factor(self) -> None:
        """Nothing: the contract's weights already carry ``a``."""
        return None


@dataclass(frozen=True)
class QuadapterGroup:
    """Layers sharing one input, and where the division folds (``None``: an explicit Mul stays)."""

    layers: tuple[str, ...]
    fold: tuple[str, str] | None  # ("norm", module name) | ("rows", producer layer name)
    rows: tuple[int, int] | None = None  # the producer's output rows for a "rows" fold


# family -> [(consumer leaf names, fold kind, fold source leaf, rows spec)] within one block
_RULES: dict[str, list[tuple[tuple[str, ...], str | None, str | None]]] = {
    "bert": [
        (("attention.self.query", "attention.self.key", "attention.self.value"), None, None),
        (("attention.output.dense",), "rows", "attention.self.value"),
        (("intermediate.dense",), None, None),
    ],
    "gpt2": [
        (("attn.c_attn",), "norm", "ln_1"),
        (("attn.c_proj",), "rows", "attn.c_attn"),
        (("mlp.c_fc",), "norm", "ln_2"),
    ],
    "llama": [
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", "input_layernorm"),
        (("self_attn.o_proj",), "rows", "self_attn.v_proj"),
        (("mlp.gate_proj", "mlp.up_proj"), "norm", "post_attention_layernorm"),
        (("mlp.down_proj",), "rows", "mlp.up_proj"),
    ],
}
_BLOCK = re.compile(r"^(.*?(?:layer|h|layers)\.\d+)\.(.+)$")


def quadapter_groups(backbone: nn.Module, layer_names: list[str], positions: str) -> list[QuadapterGroup]:
    """The groups for this model's family; ``positions`` is ``foldable`` or ``all``."""
    family = backbone.config.model_type
    rules = _RULES.get(family)
    if rules is None:
        raise ValueError(f"Quadapter has no placement rules for model type {family!r}")
    config = backbone.config
    gqa = getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
    blocks: dict[str, set[str]] = {}
    for name in layer_names:
        match = _BLOCK.match(name)
        if match:
            blocks.setdefault(match.group(1), set()).add(match.group(2))
    groups = []
    for block, leaves in blocks.items():
        for consumers, fold_kind, source in rules:
            if not set(consumers) <= leaves:
                continue
            fold = None if fold_kind is None else (fold_kind, f"{block}.{source}")
            rows = None
            if fold_kind == "rows" and source == "attn.c_attn":  # GPT-2's fused QKV: V is the last third
                hidden = config.n_embd
                rows = (2 * hidden, 3 * hidden)
            if fold_kind == "rows" and source == "self_attn.v_proj" and gqa:
                fold = None  # with grouped KV heads one V channel serves several heads: no exact fold
            if fold is None and positions != "all":
                continue
            groups.append(QuadapterGroup(tuple(f"{block}.{c}" for c in consumers), fold, rows))
    return groups


def attach_quadapters(backbone: nn.Module, groups: list[QuadapterGroup]) -> None:
    """Give every layer of each group the group's shared :class:`ChannelScale`."""
    for group in groups:
        first: QuantLinear = backbone.get_submodule(group.layers[0])
        shared = ChannelScale(first.in_features)
        for name in group.layers:
            backbone.get_submodule(name).quadapter = shared


@torch.no_grad()
def smoothquant_init(layers: list[QuantLinear], act_absmax: torch.Tensor, alpha: float) -> None:
    """SmoothQuant's closed form (arXiv 2211.10438): a_j = max|X_j|^alpha / max|W_j|^(1-alpha)."""
    weight_absmax = torch.stack([layer.weight.abs().amax(dim=0) for layer in layers]).amax(dim=0)
    scale = act_absmax.clamp(min=1e-5).pow(alpha) / weight_absmax.clamp(min=1e-5).pow(1 - alpha)
    scale = scale / scale.mean()  # overall size is irrelevant to the function; keep it near 1
    layers[0].quadapter.scale.copy_(scale.clamp(min=1e-3))


@torch.no_grad()
def fold_quadapters(backbone: nn.Module, groups: list[QuadapterGroup]) -> None:
    """Fold each group's division into its source and its multiplication into the weights, in place.

    Afterwards the folded layers have no Quadapter; unfoldable groups keep theirs (exported as a Mul).
    The folded model computes the same function as before (up to float rounding).
    """
    for group in groups:
        if group.fold is None:
            continue
        kind, source = group.fold
        layers: list[QuantLinear] = [backbone.get_submodule(name) for name in group.layers]
        scale = layers[0].quadapter.scale.detach().clone()
        for layer in layers:
            layer.weight.mul_(scale)
            layer.quadapter = None
        producer = backbone.get_submodule(source)
        if kind == "norm":
            producer.weight.div_(scale)
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(scale)
            continue
        start, stop = group.rows or (0, producer.out_features)
        producer.weight[start:stop].div_(scale.unsqueeze(-1))
        if producer.bias is not None:
            producer.bias[start:stop].div_(scale)
        wq = producer.weight_quantizer
        new_scale = wq.scale.detach().clone()
        new_scale[start:stop] = new_scale[start:stop] / scale.reshape(-1, *([1] * (new_scale.dim() - 1)))
        wq.set_scale(new_scale)
