"""Config checks that need the model's own config (read without loading weights)."""

from __future__ import annotations

from transformers import PretrainedConfig

from calib.models import load_model_config
from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError


def max_positions(model_config: PretrainedConfig) -> int | None:
    """The longest sequence the model accepts, if it says."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    return None


def layer_widths(model_config: PretrainedConfig) -> set[int]:
    """Input widths of the quantized layers: the hidden size and the MLP's inner size."""
    hidden = getattr(model_config, "hidden_size", None) or model_config.n_embd
    inner = getattr(model_config, "intermediate_size", None) or getattr(model_config, "n_inner", None) or 4 * hidden
    return {hidden, inner}


def check_against_model(config: PipelineConfig, source: str) -> PretrainedConfig:
    """Raise a one-line :class:`ConfigError` for values the model cannot take; returns its config."""
    try:
        model_config = load_model_config(config.model, config.task)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    limit = max_positions(model_config)
    if limit is not None:
        if config.calib.seq_len > limit:
            raise ConfigError(
                f"{source}: calib.seq_len: expected at most {limit} (the model's maximum), got {config.calib.seq_len}"
            )
        for i, (_, seq) in enumerate(config.validate.shapes):
            if seq > limit:
                raise ConfigError(
                    f"{source}: validate.shapes[{i}]: expected a sequence length of at most {limit}, got {seq}"
                )
    tied = getattr(model_config, "tie_word_embeddings", False) and config.task.kind == "causal-lm"
    if config.quant.embedding_bits is not None and tied:
        raise ConfigError(
            f"{source}: quant.embedding_bits: expected nothing for a model whose LM head shares the embedding "
            f"table (it would quantize the head too), got {config.quant.embedding_bits}"
        )
    groups = [("quant.weights.group_size", config.quant.weights.group_size)]
    groups += [(f"export.int4_weight_only[{i}]", g) for i, g in enumerate(config.export.int4_weight_only)]
    widths = sorted(layer_widths(model_config))
    for key, group in groups:
        if group and any(width % group for width in widths):
            raise ConfigError(
                f"{source}: {key}: expected a divisor of every layer width ({', '.join(map(str, widths))}), got {group}"
            )
    return model_config
