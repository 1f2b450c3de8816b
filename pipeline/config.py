"""Typed pipeline configuration: plain dataclasses, read from YAML and validated before any work starts.

Every error names the file, the key path (``quant.weights.bits``) and what is expected, on one line.
Checks that need the model's own config (group size vs layer width, sequence length vs maximum)
live in :mod:`pipeline.model_checks`, which runs right after this structural pass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError

Family = Literal["bert", "gpt2", "llama"]
TaskKind = Literal["embedding", "classification", "causal-lm"]
Metric = Literal["spearman", "accuracy", "matthews", "perplexity"]
CalibMethod = Literal["zsaq", "random-tokens", "gaussian-embeds", "teacher-sampled", "real-data"]
GeneratorKind = Literal["soft-tokens", "lm-adapter"]
WeightGranularity = Literal["per-channel", "per-group"]
RangeInit = Literal["minmax", "percentile", "mse"]
ExportFormat = Literal["onnx", "trt", "triton"]
CpuInt8Weights = Literal["auto", "int8", "uint8"]


@dataclass(frozen=True)
class RandomModel:
    """A tiny random-init model for tests and smoke runs."""

    family: Family
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    intermediate: int = 128
    vocab_size: int = 512
    max_positions: int = 128
    seed: int = 0


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of: hub ``id``, local ``path``, ``package`` folder (``pkg/sub/dir``), ``random``."""

    id: str | None = None
    path: str | None = None
    package: str | None = None
    random: RandomModel | None = None
    gguf_file: str | None = None

    def describe(self) -> str:
        """A short human label for reports."""
        if self.random is not None:
            return f"random:{self.random.family}"
        return str(self.id or self.path or f"package:{self.package}")


@dataclass(frozen=True)
class EvalData:
    """Task data used only by the validate stage (never by calibration)."""

    data: str
    metric: Metric
    limit: int | None = None


@dataclass(frozen=True)
class TaskConfig:
    """What the model is used for, which fixes its head and its exported outputs."""

    kind: TaskKind = "embedding"
    num_labels: int = 2
    eval: EvalData | None = None


@dataclass(frozen=True)
class GeneratorConfig:
    """The ZSAQ generator: pseudo-inputs in the teacher's word-embedding space (``inputs_embeds``).

    ``soft-tokens``: noise -> per-position logits over the (restricted) vocabulary -> Gumbel-softmax with
    the temperature annealed from ``temperature[0]`` to ``temperature[1]`` -> times the embedding matrix.
    ``lm-adapter``: a pre-trained causal LM (``model``; default: the teacher itself when it is one) writes
    text once, cut to lengths in ``[min_len, seq_len]`` and read by the teacher's tokenizer; an adapter MLP
    of width ``adapter_size`` maps the LM's hidden states (plus noise) to a residual on the teacher's
    embeddings of that text (see :class:`calib.generators.LMAdapterGenerator`), bounded per channel by
    ``radius`` times the embedding table's std: the ascent seeks the worst inputs *near* natural text
    (unbounded, the ascent drove the STS-B discrepancy from 0.4 to 120 in 60 rounds; at 0.25 the student
    came out less faithful to FP than on random tokens; 0.05 measured best). ``learn_lm: false`` (default)
    trains the adapter only: on a CPU, back-propagating through the LM every step costs more than the
    whole rest, and ZSAQ found the generator's size barely matters.
    """

    kind: GeneratorKind = "soft-tokens"
    model: ModelSource | None = None
    adapter_size: int = 256
    noise_dim: int = 64
    temperature: tuple[float, float] = (1.0, 0.3)
    min_len: int = 16
    batch_size: int = 8
    lr: float = 1e-3
    learn_lm: bool = False
    radius: float = 0.05
    restrict_vocab: bool = True


@dataclass(frozen=True)
class PriorConfig:
    """Terms the generator minimises besides the ascent, to keep inputs plausible to the teacher.

    ``confidence``: the teacher's output entropy (confident predictions); ``balance``: for classifiers, the
    KL from the batch's mean prediction to uniform; ``embedding_stats``: distance of the generated
    embeddings' per-channel mean / std from those of the teacher's own word-embedding table.
    """

    confidence: float = 0.0
    balance: float = 0.0
    embedding_stats: float = 0.1


@dataclass(frozen=True)
class SharpnessConfig:
    """Sharpness-aware generation (arXiv 2510.07018): match each batch's student gradient with that of its
    neighbours in embedding space (a copy moved by ``radius`` x its norm in a random direction)."""

    enabled: bool = False
    weight: float = 0.1
    radius: float = 0.05


@dataclass(frozen=True)
class SamSgaConfig:
    """The minimax game: generator ascent steps (SGA) against student SAM descent steps, per round.

    The student's learnable parameters, learning rate and loss weights are those of ``quant.learn``.
    ``sam: false`` swaps SAM for plain AdamW; ``adversarial: false`` freezes the generator (no ascent).
    ``adaptive`` scales SAM's perturbation by each parameter's magnitude (ASAM), since step sizes,
    Quadapter scales and weights differ by orders of magnitude.
    """

    rounds: int = 150
    generator_steps: int = 1
    student_steps: int = 1
    rho: float = 0.05
    adaptive: bool = True
    sam: bool = True
    adversarial: bool = True
    checkpoint_every: int = 25


@dataclass(frozen=True)
class CalibConfig:
    """Data-free calibration. ``zsaq`` trains a generator against the student (SAM-SGA); the others are
    baselines: uniform ``random-tokens``, ``gaussian-embeds`` (the embedding table's per-channel
    statistics), ``teacher-sampled`` (sequences a causal-LM teacher samples itself, as LLM-QAT does) and
    ``real-data`` (reads ``real_data``: an upper bound for benchmarks only, flagged in every report)."""

    method: CalibMethod = "zsaq"
    samples: int = 256
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    real_data: str | None = None
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    sam_sga: SamSgaConfig = field(default_factory=SamSgaConfig)
    priors: PriorConfig = field(default_factory=PriorConfig)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)


@dataclass(frozen=True)
class WeightQuant:
    """Signed symmetric weights: per output channel, or in groups along the input dimension."""

    bits: int = 8
    granularity: WeightGranularity = "per-channel"
    group_size: int | None = None
    init: RangeInit = "minmax"


@dataclass(frozen=True)
class ActivationQuant:
    """Signed symmetric per-tensor activations (zero-point 0); 16 means left in float (W*A16)."""

    bits: int = 8
    init: RangeInit = "percentile"
    percentile: float = 99.99


QuadapterPositions = Literal["foldable", "all"]
QuadapterInit = Literal["ones", "smoothquant"]
Learnable = Literal["step-sizes", "quadapter", "weights"]
LearnMode = Literal["end-to-end", "block-wise"]


@dataclass(frozen=True)
class QuadapterConfig:
    """Learned per-channel activation scales folded into neighbouring weights (``positions: all`` adds
    a Mul where no fold is exact, e.g. BERT's post-LN inputs)."""

    enabled: bool = False
    positions: QuadapterPositions = "foldable"
    init: QuadapterInit = "smoothquant"
    alpha: float = 0.5


@dataclass(frozen=True)
class LearnConfig:
    """Quantizer learning by distillation from the teacher on the calibration inputs.

    Rates are relative to each tensor's magnitude (see :func:`calib.learn.relative_adamw`). ``weights_lr``
    is the weights' own rate (None: ``lr``): step sizes learn well at 0.01, while weights moving 1% of
    their magnitude a step took an SST-2 MiniLM student to chance accuracy within 60 steps (docs/RESULTS.md).
    """

    steps: int = 0
    mode: LearnMode = "end-to-end"
    params: tuple[Learnable, ...] = ("step-sizes", "quadapter")
    lr: float = 1e-3
    weights_lr: float | None = None
    weight_decay: float = 0.0
    kl_weight: float = 1.0
    hidden_mse_weight: float = 1.0


@dataclass(frozen=True)
class QuantConfig:
    """What is quantized and how."""

    weights: WeightQuant = field(default_factory=WeightQuant)
    activations: ActivationQuant = field(default_factory=ActivationQuant)
    # Word-embedding table, weight-only per row; None keeps it in float (the default: see README).
    embedding_bits: int | None = None
    # Q/DQ on the inputs of the attention matmuls (QK^T, AV) for TensorRT's int8 attention; off by default:
    # ONNX Runtime's CPU kernels gain little from it and the softmax output is the most fragile tensor.
    attention_matmuls: bool = False
    # The LM head (causal LMs) as a quantized layer; off by default, see README.
    lm_head: bool = False
    quadapter: QuadapterConfig = field(default_factory=QuadapterConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)


@dataclass(frozen=True)
class ExportConfig:
    """Which artifacts to produce beyond the student (``--export`` on the command line adds to these).

    ``int4_accuracy_level`` is MatMulNBits' compute mode in the CPU flavour: 0 computes in float on the
    dequantized int4 weights (exactly the student's function); 4 quantizes activations to int8 per block
    on the fly (faster, no longer bit-identical to the student).

    ``int4_weight_only`` lists group sizes for extra W4A16 CPU models of the teacher (round-to-nearest
    per group, int8 embedding table): weight-only int4 needs no activation ranges, so no calibration."""

    formats: tuple[ExportFormat, ...] = ("onnx",)
    opset: int = 17
    int4_accuracy_level: int = 0
    # How the CPU flavour stores 8-bit weights: int8 (the fast kernels where the CPU has a VNNI dot
    # product) or uint8 with zero point 128 (exact on AVX2-only x86, whose uint8 x int8 kernels saturate);
    # auto picks by the exporting machine, which should be the serving machine's kind.
    cpu_int8_weights: CpuInt8Weights = "auto"
    int4_weight_only: tuple[int, ...] = ()
    # ONNX Runtime's dynamic int8 quantization of the FP32 graph: the data-free option users have today,
    # validated beside the student as the bar it must beat.
    ort_dynamic_baseline: bool = True


@dataclass(frozen=True)
class ValidateConfig:
    """Shapes to time, how, and the thresholds that fail the stage."""

    shapes: tuple[tuple[int, int], ...] = ((1, 128), (8, 128))
    warmup: int = 3
    repeats: int = 20
    threads: int = 0
    min_agreement: float | None = None
    samples: int = 64


@dataclass(frozen=True)
class PipelineConfig:
    """The whole run."""

    model: ModelSource
    task: TaskConfig = field(default_factory=TaskConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready plain dict (the form stored in the manifest)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_config(path: str | Path) -> PipelineConfig:
    """Read and structurally validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    return parse_config(raw, source=str(path), base_dir=path.parent)


def parse_config(raw: Any, source: str = "<config>", base_dir: Path | None = None) -> PipelineConfig:
    """Build a :class:`PipelineConfig` from plain data, failing on the first problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {_kind(raw)}")
    config = _build(PipelineConfig, raw, "", source)
    _check_values(config, source)
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _build(tp: Any, value: Any, key: str, source: str) -> Any:
    """Convert ``value`` to type ``tp``; ``key`` is the dotted path used in error messages."""
    where = f"{source}: {key or '<top>'}"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(options[0], value, key, source)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_kind(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(_build(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_kind(value)}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        for name in value:
            if name not in fields:
                known = ", ".join(fields)
                raise ConfigError(f"{source}: {_join(key, name)}: unknown key (expected one of: {known})")
        kwargs = {}
        for name, f in fields.items():
            sub = _join(key, name)
            if name in value:
                kwargs[name] = _build(hints[name], value[name], sub, source)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: {sub}: required key is missing")
        return tp(**kwargs)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _check_values(config: PipelineConfig, source: str) -> None:
    """Value checks that need no model: one source, bit widths, positive sizes."""

    def fail(key: str, expected: str, got: Any) -> None:
        raise ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")

    model = config.model
    given = [k for k in ("id", "path", "package", "random") if getattr(model, k) is not None]
    if len(given) != 1:
        fail("model", "exactly one of id, path, package, random", given or "none")
    if model.random is not None:
        r = model.random
        for name in ("layers", "hidden", "heads", "intermediate", "vocab_size", "max_positions"):
            if getattr(r, name) < 1:
                fail(f"model.random.{name}", "a positive integer", getattr(r, name))
        if r.hidden % r.heads:
            fail("model.random.hidden", f"a multiple of model.random.heads ({r.heads})", r.hidden)
    w = config.quant.weights
    if w.bits not in (2, 4, 8):
        fail("quant.weights.bits", "2, 4 or 8", w.bits)
    if w.granularity == "per-group":
        if w.group_size is None:
            fail("quant.weights.group_size", "32, 64 or 128 when granularity is per-group", None)
        if w.group_size not in (32, 64, 128):
            fail("quant.weights.group_size", "32, 64 or 128", w.group_size)
        if w.bits == 8:
            fail("quant.weights.granularity", "per-channel for 8-bit weights", w.granularity)
    elif w.group_size is not None:
        fail("quant.weights.group_size", "no value unless granularity is per-group", w.group_size)
    if config.quant.embedding_bits not in (None, 8):
        fail("quant.embedding_bits", "8 or nothing (float embeddings)", config.quant.embedding_bits)
    a = config.quant.activations
    if a.bits not in (8, 16):
        fail("quant.activations.bits", "8 or 16", a.bits)
    if config.quant.attention_matmuls and a.bits != 8:
        fail("quant.attention_matmuls", "false unless quant.activations.bits is 8", True)
    if config.quant.lm_head and config.task.kind != "causal-lm":
        fail("quant.lm_head", "false unless task.kind is causal-lm (only causal LMs have an LM head)", True)
    if not 50.0 < a.percentile <= 100.0:
        fail("quant.activations.percentile", "a number in (50, 100]", a.percentile)
    learn = config.quant.learn
    if learn.steps < 0:
        fail("quant.learn.steps", "0 or more", learn.steps)
    if not 0.0 <= config.quant.quadapter.alpha <= 1.0:
        fail("quant.quadapter.alpha", "a number between 0 and 1", config.quant.quadapter.alpha)
    if not learn.params:
        fail("quant.learn.params", "at least one of step-sizes, quadapter, weights", [])
    if learn.lr <= 0:
        fail("quant.learn.lr", "a positive number", learn.lr)
    if learn.weights_lr is not None and learn.weights_lr <= 0:
        fail("quant.learn.weights_lr", "a positive number (or no value: quant.learn.lr)", learn.weights_lr)
    c = config.calib
    for name in ("samples", "seq_len", "batch_size"):
        if getattr(c, name) < 1:
            fail(f"calib.{name}", "a positive integer", getattr(c, name))
    if c.generator.model is not None:
        sources = [k for k in ("id", "path", "package", "random") if getattr(c.generator.model, k) is not None]
        if len(sources) != 1:
            fail("calib.generator.model", "exactly one of id, path, package, random", sources or "none")
    if c.method == "real-data" and c.real_data is None:
        fail("calib.real_data", "a task data file when calib.method is real-data", None)
    g = c.generator
    if not 1 <= g.min_len <= c.seq_len:
        fail("calib.generator.min_len", f"between 1 and calib.seq_len ({c.seq_len})", g.min_len)
    if min(g.temperature) <= 0:
        fail("calib.generator.temperature", "two positive numbers [start, end]", list(g.temperature))
    if g.radius <= 0:
        fail("calib.generator.radius", "a positive number (times the embedding table's std)", g.radius)
    for name in ("adapter_size", "noise_dim", "batch_size"):
        if getattr(g, name) < 1:
            fail(f"calib.generator.{name}", "a positive integer", getattr(g, name))
    sga = c.sam_sga
    for name in ("rounds", "generator_steps", "student_steps", "checkpoint_every"):
        if getattr(sga, name) < 1:
            fail(f"calib.sam_sga.{name}", "a positive integer", getattr(sga, name))
    if sga.rho <= 0:
        fail("calib.sam_sga.rho", "a positive number", sga.rho)
    if config.task.kind == "classification" and config.task.num_labels < 2:
        fail("task.num_labels", "2 or more", config.task.num_labels)
    if config.task.kind == "causal-lm" and config.model.random is not None and config.model.random.family == "bert":
        fail("task.kind", "embedding or classification for a bert model", config.task.kind)
    v = config.validate
    for i, (batch, seq) in enumerate(v.shapes):
        if batch < 1 or seq < 1:
            fail(f"validate.shapes[{i}]", "[batch, sequence] of positive integers", [batch, seq])
    if v.repeats < 1:
        fail("validate.repeats", "a positive integer", v.repeats)
    if v.min_agreement is not None and not 0.0 <= v.min_agreement <= 1.0:
        fail("validate.min_agreement", "a fraction between 0 and 1", v.min_agreement)
    for index, group in enumerate(config.export.int4_weight_only):
        if group not in (32, 64, 128):
            fail(f"export.int4_weight_only[{index}]", "32, 64 or 128", group)
    if config.export.int4_accuracy_level not in (0, 1, 2, 3, 4):
        fail(
            "export.int4_accuracy_level",
            "0, 1, 2, 3 or 4 (MatMulNBits accuracy_level)",
            config.export.int4_accuracy_level,
        )
    if config.export.opset < 17:
        fail("export.opset", "17 or newer (per-channel QuantizeLinear/DequantizeLinear)", config.export.opset)


def _resolve_paths(config: PipelineConfig, base_dir: Path) -> PipelineConfig:
    """Relative file paths in a config are relative to the config file's folder."""

    def resolve(p: str) -> str:
        return str((base_dir / p).resolve()) if not Path(p).is_absolute() else p

    model = config.model
    if model.path is not None:
        model = dataclasses.replace(model, path=resolve(model.path))
    calib = config.calib
    if calib.real_data is not None:
        calib = dataclasses.replace(calib, real_data=resolve(calib.real_data))
    gen_model = calib.generator.model
    if gen_model is not None and gen_model.path is not None:
        gen_model = dataclasses.replace(gen_model, path=resolve(gen_model.path))
        calib = dataclasses.replace(calib, generator=dataclasses.replace(calib.generator, model=gen_model))
    task = config.task
    if task.eval is not None:
        task = dataclasses.replace(task, eval=dataclasses.replace(task.eval, data=resolve(task.eval.data)))
    return dataclasses.replace(config, model=model, task=task, calib=calib)


def with_export_formats(config: PipelineConfig, extra: tuple[str, ...]) -> PipelineConfig:
    """Add ``--export`` formats from the command line to the config's own (onnx is always made)."""
    formats = list(dict.fromkeys(("onnx", *config.export.formats, *extra)))
    return dataclasses.replace(config, export=dataclasses.replace(config.export, formats=tuple(formats)))
