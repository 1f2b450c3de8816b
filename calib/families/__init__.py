"""Model families: everything the code knows about an architecture, one :class:`FamilySpec` each, in its
own module and registered in :data:`FAMILIES` by its transformers ``model_type``."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from calib.config import RandomModel, TaskConfig

# transformers config attribute -> the calib.config.RandomModel field that sets it (BERT's and Llama's names)
STANDARD_SIZES = {
    "hidden_size": "hidden",
    "num_hidden_layers": "layers",
    "num_attention_heads": "heads",
    "intermediate_size": "intermediate",
    "max_position_embeddings": "max_positions",
}


@dataclass(frozen=True)
class FoldRule:
    """Layers of one block that read the same tensor, and where a Quadapter's division folds away exactly:
    ``"norm"`` (into the norm ``source``), ``"rows"`` (into the output rows of the linear ``source``, picked by
    ``rows(config)`` when it is fused), or None (an explicit Mul stays). ``exact_with_grouped_kv: False``: not
    exact under grouped-query attention."""

    consumers: tuple[str, ...]
    fold: str | None = None
    source: str | None = None
    rows: Callable[[PretrainedConfig], tuple[int, int]] | None = None
    exact_with_grouped_kv: bool = True


@dataclass(frozen=True)
class RotationSpec:
    """Where a pre-norm decoder's residual stream is read and written, for :mod:`calib.rotation` (names under
    the backbone; ``norm_readers`` and the rest under each block): the tables that add into the stream, each
    norm with the linears that read its output, the linears that write into the stream, the value projection
    (``value_rows``: its rows in a fused QKV) with the output projection that reads the heads, and the MLP's
    down projection."""

    embeddings: tuple[str, ...]
    final_norm: str
    norm_readers: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    value: str
    output: str
    down: str
    value_rows: Callable[[PretrainedConfig], tuple[int, int]] | None = None


@dataclass(frozen=True)
class FamilySpec:
    """One architecture: its numbered blocks (``<block>.N.``), their linear layers' input groups and fold
    rules, the attention module, which task kinds it serves, and how a tiny random model of it is configured
    (transformers' ``config_class``, which of its attributes the RandomModel sizes set, fixed extras), and
    where its residual stream can be rotated."""

    name: str
    block: str
    fold_rules: tuple[FoldRule, ...]
    attention: str
    config_class: str
    sizes: dict[str, str] = field(default_factory=lambda: dict(STANDARD_SIZES))
    config_extra: dict[str, Any] = field(default_factory=dict)
    task_kinds: tuple[str, ...] = ("embedding", "classification", "causal-lm")
    rotation: RotationSpec | None = None  # None: the residual stream cannot be rotated (BERT's post-LN)

    def random_config(self, spec: RandomModel, task: TaskConfig) -> PretrainedConfig:
        """A tiny transformers config of this family with the sizes of ``spec``."""
        import transformers

        sizes = {name: getattr(spec, field) for name, field in self.sizes.items()}
        common = {"vocab_size": spec.vocab_size, "num_labels": task.num_labels, "pad_token_id": 0}
        return getattr(transformers, self.config_class)(**sizes, **self.config_extra, **common)

    @property
    def shared_inputs(self) -> tuple[tuple[str, ...], ...]:
        """Groups of layers that read one tensor: they share one input quantizer, so the exported graph
        quantizes it once (and TensorRT can fuse Q, K and V into one GEMM, which needs one scale)."""
        return tuple(rule.consumers for rule in self.fold_rules if len(rule.consumers) > 1)


def layer_widths(model_config: PretrainedConfig) -> set[int]:
    """Input widths of the quantized layers: the hidden size and the MLP's inner size."""
    hidden = getattr(model_config, "hidden_size", None) or model_config.n_embd
    inner = getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None) or 4 * hidden
    return {hidden, inner}


# The registration: each family module defines ``SPEC``, registered under its transformers model_type.
FAMILY_MODULES = ("bert", "gpt2", "llama", "qwen2")
FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec for spec in (importlib.import_module(f"calib.families.{m}").SPEC for m in FAMILY_MODULES)
}
BLOCK_PATTERN = re.compile(r"(^|\.)(" + "|".join(sorted({s.block for s in FAMILIES.values()})) + r")\.\d+\.")


def family_of(model: Any) -> FamilySpec:
    """The spec of a transformers model or config (by its ``model_type``)."""
    model_type = getattr(getattr(model, "config", model), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model type {model_type!r} has no FamilySpec (registered: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def block_of(layer_name: str) -> str | None:
    """``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3``; None outside the blocks (``lm_head``)."""
    match = BLOCK_PATTERN.search(layer_name)
    return layer_name[: match.end() - 1] if match else None
