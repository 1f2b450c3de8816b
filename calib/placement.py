"""Where quantizers go: an input and a weight quantizer on every linear layer of the family's numbered
blocks, as TensorRT's explicit quantization fuses them (docs/ARCHITECTURE.md); shared inputs share one."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from calib.config import QuantConfig
from calib.families import BLOCK_PATTERN, family_of
from calib.quant_linear import QuantLinear


def quantizable_layers(model: nn.Module, lm_head: bool = False) -> list[str]:
    """Qualified names of the layers the student quantizes, in module order (plus ``lm_head`` if asked)."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and BLOCK_PATTERN.search(name)
    ]
    if lm_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        names.append("lm_head")
    return names


def insert_quantizers(model: nn.Module, quant: QuantConfig) -> list[str]:
    """Swap each quantizable layer for a :class:`QuantLinear` in place; returns their names.

    A tied LM head (GPT-2) keeps sharing the embedding table in float: its QuantLinear holds its own copy."""
    names = quantizable_layers(model, quant.lm_head)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear(getattr(parent, child), quant))
    _share_input_quantizers(model, names)
    return names


def _share_input_quantizers(model: nn.Module, names: list[str]) -> None:
    """Give the layers of each of the family's shared-input groups the first one's input quantizer."""
    groups = family_of(model).shared_inputs
    present = set(names)
    for name in names:
        for group in groups:
            if not name.endswith("." + group[0]):
                continue
            block = name[: -len(group[0])]
            members = [block + leaf for leaf in group]
            if set(members) <= present:
                shared = model.get_submodule(members[0]).input_quantizer
                for member in members[1:]:
                    model.get_submodule(member).input_quantizer = shared
