"""Stage 2: data-free calibration inputs. Reads only the teacher; never task data."""

from __future__ import annotations

from typing import Any

from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from calib.inputs import random_tokens
from pipeline.stages.base import Stage, StageContext
from pipeline.stages.teacher import MODEL_DIR

INPUTS_FILE = "inputs.safetensors"


def special_token_ids(model_dir: str) -> tuple[tuple[int, ...], int]:
    """(special ids to avoid, pad id) from the saved tokenizer, or none when there is no tokenizer."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        return (), 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    specials = set(tokenizer.all_special_ids)
    specials.update(i for tok, i in tokenizer.get_vocab().items() if tok.startswith("[unused"))
    return tuple(sorted(specials)), pad


class CalibrateStage(Stage):
    """Writes ``calibrate/inputs.safetensors`` (input_ids, attention_mask)."""

    name = "calibrate"
    requires = ("teacher",)
    config_sections = ("model", "task", "calib")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        calib = ctx.config.calib
        model_dir = str(ctx.input_dir("teacher") / MODEL_DIR)
        model_config = AutoConfig.from_pretrained(model_dir)
        specials, pad = special_token_ids(model_dir)
        batch = random_tokens(calib.samples, calib.seq_len, model_config.vocab_size, calib.seed, specials, pad)
        save_file(
            {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask},
            str(ctx.out / INPUTS_FILE),
        )
        return {
            "method": calib.method,
            "note": "uniform random token ids: a data-free baseline, not ZSAQ",
            "samples": calib.samples,
            "seq_len": calib.seq_len,
            "mean_length": round(float(batch.attention_mask.sum(1).float().mean()), 2),
        }
