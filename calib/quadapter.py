"""Quadapter (arXiv 2211.16912): learned per-channel scales around quantized linear layers, folded into a
neighbouring layer at export where the family's fold rules say that is exact (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calib.families import block_of, family_of
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


def quadapter_groups(backbone: nn.Module, layer_names: list[str], positions: str) -> list[QuadapterGroup]:
    """The groups of the model family's fold rules; ``positions`` is ``foldable`` or ``all``."""
    config = backbone.config
    rules = family_of(backbone).fold_rules
    grouped_kv = getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
    blocks: dict[str, set[str]] = {}
    for name in layer_names:
        block = block_of(name)
        if block is not None:
            blocks.setdefault(block, set()).add(name[len(block) + 1 :])
    groups = []
    for block, leaves in blocks.items():
        for rule in rules:
            if not set(rule.consumers) <= leaves:
                continue
            exact = rule.fold is not None and (rule.exact_with_grouped_kv or not grouped_kv)
            if not exact and positions != "all":
                continue
            fold = (rule.fold, f"{block}.{rule.source}") if exact else None
            rows = rule.rows(config) if exact and rule.rows is not None else None
            groups.append(QuadapterGroup(tuple(f"{block}.{c}" for c in rule.consumers), fold, rows))
    return groups


def attach_quadapters(backbone: nn.Module, groups: list[QuadapterGroup]) -> None:
    """Give every layer of each group the group's shared :class:`ChannelScale`."""
    for group in groups:
        first: QuantLinear = backbone.get_submodule(group.layers[0])
        shared = ChannelScale(first.in_features)
        for name in group.layers:
            backbone.get_submodule(name).quadapter = shared


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
            layer.weight.copy_(layer.effective_weight())
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
