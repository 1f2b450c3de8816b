"""Pre-flight checks that need the model's own config and the files the config names (headers only, no
weights loaded): everything a run would otherwise find out hours later."""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig

from calib.errors import ConfigError
from calib.families import family_of, layer_widths
from calib.models import check_weights, load_model_config
from calib.registry import METHODS
from calib.task_data import load_eval_set
from pipeline.config import PipelineConfig


def max_positions(model_config: PretrainedConfig) -> int | None:
    """The longest sequence the model accepts, if it says."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_against_model(config: PipelineConfig, source: str) -> PretrainedConfig:
    """Raise a one-line :class:`ConfigError` for values the model cannot take; returns its config."""
    try:
        model_config = load_model_config(config.model, config.task)
        check_weights(config.model)
        _check_task_files(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        family = family_of(model_config)
    except ValueError as exc:
        raise ConfigError(f"{source}: model: {exc}") from None
    if config.task.kind not in family.task_kinds:
        kinds = " or ".join(family.task_kinds)
        raise ConfigError(f"{source}: task.kind: expected {kinds} for a {family.name} model, got {config.task.kind!r}")
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
    if config.quant.embedding_bits == 8 and tied:
        raise ConfigError(
            f"{source}: quant.embedding_bits: expected nothing for a model whose LM head shares the embedding "
            f"table (it would quantize the head too), got {config.quant.embedding_bits}"
        )
    groups = [("quant.weights.group_size", config.quant.weights.group_size)]
    groups += [("quant.activations.block_size", config.quant.activations.block_size)]
    groups += [(f"export.int4_weight_only[{i}]", g) for i, g in enumerate(config.export.int4_weight_only)]
    widths = sorted(layer_widths(model_config))
    for key, group in groups:
        if group and any(width % group for width in widths):
            raise ConfigError(
                f"{source}: {key}: expected a divisor of every layer width ({', '.join(map(str, widths))}), got {group}"
            )
    return model_config


def _check_task_files(config: PipelineConfig) -> None:
    """The evaluation file reads as its metric needs; the real-data file reads as task text."""
    ev = config.task.eval
    if ev is not None and Path(ev.data).is_file():
        data = load_eval_set(Path(ev.data), ev.metric, ev.limit)
        if ev.metric == "spearman" and config.task.kind == "embedding" and not data.texts_b:
            raise ConfigError(f"task.eval.data: {ev.data} has no sentence pairs (sentence1, sentence2) to score")
    if METHODS[config.calib.method].uses_data:
        text_kind = "perplexity" if config.task.kind == "causal-lm" else "accuracy"  # a corpus, or a GLUE file
        load_eval_set(Path(config.calib.real_data), text_kind, None)
