"""The comparison table's rows: every method runs in one harness with one quantizer, so rows compare methods.

A row is a method (how the quantized model is obtained), a scheme (weight / activation bits) and, for
calibrated methods, where the calibration inputs come from. ``kinds`` says which task kinds a row applies
to; ``not_run`` gives, per kind, why a row that would apply was not run (the table prints the reason).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from pipeline.config import PipelineConfig

Method = Literal["fp32", "rtn", "ort-dynamic", "ptq", "qat", "gptq", "zsaq"]
Inputs = Literal["random-tokens", "real-data", "teacher-sampled"]
TaskFamily = Literal["encoder", "decoder"]
RTN_GROUP = 32  # the weight-only int4 row is the export stage's W4A16 model with groups of 32


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    key: str
    label: str
    method: Method
    weight_bits: int = 32
    act_bits: int = 32
    inputs: Inputs | None = None
    sam: bool = True
    adversarial: bool = True
    sharpness: bool = False
    kinds: tuple[TaskFamily, ...] = ("encoder", "decoder")
    not_run: tuple[tuple[TaskFamily, str], ...] = ()

    @property
    def scheme(self) -> str:
        """``W4A8``, ``W8 dynamic``, ``FP32``."""
        if self.method == "fp32":
            return "FP32"
        if self.method == "ort-dynamic":
            return f"W{self.weight_bits} dynamic"
        return f"W{self.weight_bits}A{self.act_bits}"

    @property
    def seeded(self) -> bool:
        """Whether the result depends on a seed (calibration inputs or a generator)."""
        return self.inputs is not None or self.method == "zsaq"

    @property
    def uses_data(self) -> bool:
        """Calibrated on real task data: an upper bound, never a data-free result."""
        return self.inputs == "real-data"

    @property
    def latency_format(self) -> str | None:
        """The exported CPU model whose speed and size this row has (None: measured for no such model)."""
        if self.method == "fp32":
            return "fp32"
        if self.method == "ort-dynamic":
            return "ort-dynamic"
        if self.weight_bits == 2:
            return None  # no runtime executes 2-bit weights: the W2 student is PyTorch-only
        if self.act_bits == 16:
            return f"w{self.weight_bits}a16"
        return f"w{self.weight_bits}a8"

    def reason_not_run(self, family: TaskFamily) -> str | None:
        """Why this row has no figure for tasks of ``family`` (None: it runs)."""
        if family not in self.kinds:
            return "n/a"
        return dict(self.not_run).get(family)


NO_WIKITEXT_TRAIN = ("decoder", "no WikiText-2 training split in ../shared/data (only test and valid)")
ROWS: tuple[Row, ...] = (
    Row("fp32", "FP32 teacher", "fp32"),
    Row("rtn-w8a16", "round-to-nearest, no calibration", "rtn", 8, 16),
    Row("rtn-w4a16", f"round-to-nearest, no calibration (int4 groups of {RTN_GROUP})", "rtn", 4, 16),
    Row("ort-dynamic", "ONNX Runtime quantize_dynamic", "ort-dynamic", 8),
    Row("ptq-random-w8a8", "static PTQ on random tokens", "ptq", 8, 8, "random-tokens"),
    Row("ptq-random-w4a8", "static PTQ on random tokens", "ptq", 4, 8, "random-tokens", kinds=("encoder",)),
    Row("qat-random-w8a8", "QAT on random tokens", "qat", 8, 8, "random-tokens"),
    Row("qat-random-w4a8", "QAT on random tokens", "qat", 4, 8, "random-tokens", kinds=("encoder",)),
    Row("qat-random-w4a16", "QAT on random tokens", "qat", 4, 16, "random-tokens", kinds=("decoder",)),
    Row("qat-random-w2a8", "QAT on random tokens", "qat", 2, 8, "random-tokens", kinds=("encoder",)),
    Row(
        "gptq-random-w4a8", "GPTQ on generated (random-token) inputs", "gptq", 4, 8, "random-tokens", kinds=("encoder",)
    ),
    Row(
        "gptq-random-w4a16",
        "GPTQ on generated (random-token) inputs",
        "gptq",
        4,
        16,
        "random-tokens",
        kinds=("decoder",),
    ),
    Row("llmqat-w8a8", "QAT on self-generated text (LLM-QAT)", "qat", 8, 8, "teacher-sampled", kinds=("decoder",)),
    Row("llmqat-w4a16", "QAT on self-generated text (LLM-QAT)", "qat", 4, 16, "teacher-sampled", kinds=("decoder",)),
    Row("gptq-selfgen-w4a16", "GPTQ on self-generated text", "gptq", 4, 16, "teacher-sampled", kinds=("decoder",)),
    Row(
        "ptq-real-w4a8",
        "static PTQ on real task data (uses data)",
        "ptq",
        4,
        8,
        "real-data",
        not_run=(NO_WIKITEXT_TRAIN,),
    ),
    Row("qat-real-w4a8", "QAT on real task data (uses data)", "qat", 4, 8, "real-data", not_run=(NO_WIKITEXT_TRAIN,)),
    Row("zsaq-w8a8", "ZSAQ (SAM-SGA)", "zsaq", 8, 8),
    Row("zsaq-w4a8", "ZSAQ (SAM-SGA)", "zsaq", 4, 8, kinds=("encoder",)),
    Row("zsaq-w4a16", "ZSAQ (SAM-SGA)", "zsaq", 4, 16, kinds=("decoder",)),
    Row("zsaq-w2a8", "ZSAQ (SAM-SGA)", "zsaq", 2, 8, kinds=("encoder",)),
    Row("zsaq-sharpness-w4a8", "ZSAQ + sharpness-aware generation", "zsaq", 4, 8, sharpness=True, kinds=("encoder",)),
    Row("zsaq-no-sam-w4a8", "ZSAQ without SAM (AdamW)", "zsaq", 4, 8, sam=False, kinds=("encoder",)),
    Row(
        "zsaq-no-ascent-w4a8",
        "ZSAQ without ascent (frozen generator)",
        "zsaq",
        4,
        8,
        adversarial=False,
        kinds=("encoder",),
    ),
)


def row_by_key(key: str) -> Row:
    """The row named ``key`` (KeyError names the known keys)."""
    for row in ROWS:
        if row.key == key:
            return row
    raise KeyError(f"unknown row '{key}' (known: {', '.join(r.key for r in ROWS)})")


def task_family(config: PipelineConfig) -> TaskFamily:
    """Decoders are causal LMs; every other task kind runs an encoder."""
    return "decoder" if config.task.kind == "causal-lm" else "encoder"


def row_config(base: PipelineConfig, row: Row, seed: int, real_data: str | None) -> PipelineConfig:
    """The task's benchmark config with the row's scheme, method switches and seed applied.

    Weights keep the task config's granularity; activations at 16 bits stay in float. (Weight-only int4
    round-to-nearest instead takes the export stage's W4A16 layout: see ``benchmark_cell``.)"""
    weights = dataclasses.replace(base.quant.weights, bits=row.weight_bits)
    activations = dataclasses.replace(base.quant.activations, bits=16 if row.act_bits > 8 else row.act_bits)
    quant = dataclasses.replace(base.quant, weights=weights, activations=activations)
    calib = dataclasses.replace(
        base.calib,
        seed=seed,
        method=row.inputs or "zsaq",
        real_data=real_data,
        sam_sga=dataclasses.replace(base.calib.sam_sga, sam=row.sam, adversarial=row.adversarial),
        sharpness=dataclasses.replace(base.calib.sharpness, enabled=row.sharpness),
    )
    return dataclasses.replace(base, quant=quant, calib=calib)
