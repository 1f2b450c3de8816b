"""Where quantizers go, as TensorRT's explicit quantization fuses them in transformer blocks.

Every ``nn.Linear`` / ``Conv1D`` inside a numbered transformer block (BERT ``encoder.layer.N``,
GPT-2 ``transformer.h.N``, Llama ``model.layers.N``) gets an input and a weight quantizer. Norms,
softmax, activations and residual adds stay in float; embeddings, the pooler and the task head
(classifier, LM head) stay in float too: they are a small share of the compute, and the head's
outputs are what the user reads.
"""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from calib.quant_linear import QuantLinear
from pipeline.config import QuantConfig

BLOCK_PATTERN = re.compile(r"(^|\.)(layer|h|layers)\.\d+\.")


def quantizable_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers the student quantizes, in module order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and BLOCK_PATTERN.search(name)
    ]


def insert_quantizers(model: nn.Module, quant: QuantConfig) -> list[str]:
    """Swap each quantizable layer for a :class:`QuantLinear` in place; returns their names."""
    names = quantizable_layers(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantLinear(getattr(parent, child), quant))
    return names
