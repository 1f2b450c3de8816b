"""Where quantizers go, as TensorRT's explicit quantization fuses them in transformer blocks.

Every ``nn.Linear`` / ``Conv1D`` inside a numbered transformer block (BERT ``encoder.layer.N``,
GPT-2 ``transformer.h.N``, Llama ``model.layers.N``) gets an input and a weight quantizer. Norms,
softmax, activations and residual adds stay in float; embeddings, the pooler and the task head
(classifier, LM head) stay in float by default: they are a small share of an encoder's compute, and
the head's outputs are what the user reads. ``quant.embedding_bits`` and ``quant.lm_head`` change that
(a decoder's LM head is a large share of its weights); ``quant.attention_matmuls`` adds the attention
matmuls (:mod:`calib.quant_attention`).
"""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from calib.quant_linear import QuantLinear
from pipeline.config import QuantConfig

BLOCK_PATTERN = re.compile(r"(^|\.)(layer|h|layers)\.\d+\.")
# Layers of one block that read the same tensor: they share one input quantizer, so the exported graph
# quantizes that tensor once (and TensorRT can fuse Q, K and V into one GEMM, which needs one scale).
SHARED_INPUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "bert": (("attention.self.query", "attention.self.key", "attention.self.value"),),
    "llama": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
}


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
    """Give the layers of each :data:`SHARED_INPUTS` group the first one's input quantizer."""
    groups = SHARED_INPUTS.get(getattr(getattr(model, "config", None), "model_type", ""), ())
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
