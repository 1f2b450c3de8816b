"""TensorRT engine build from a Q/DQ ONNX graph as a strongly typed network (TensorRT 11 has no INT8 flag or
calibrators: precision comes only from Q/DQ, as in a strongly typed network on TensorRT 10). Imported lazily."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from calib.errors import StageUnavailable

INSTALL_HINT = "pip install -e '.[trt]' on a machine with an NVIDIA GPU and CUDA"


def require_tensorrt() -> ModuleType:
    """Import tensorrt and check a CUDA device exists, or raise :class:`StageUnavailable` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise StageUnavailable(f"TensorRT is not installed ({INSTALL_HINT})") from None
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        raise StageUnavailable("TensorRT is installed but no CUDA GPU is visible") from None
    return trt


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max of the (batch, sequence) input shape for the optimisation profile."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]


def input_profile(dims: tuple[int, ...], shapes: ShapeRange) -> tuple[tuple[int, ...], ...]:
    """min / opt / max of one network input (``dims``: -1 where dynamic). ``(batch, sequence)`` inputs take
    ``shapes`` (a decoder's mask spans past and new tokens: the same range); a KV-cache input ``[batch, heads,
    past, head_dim]`` keeps its heads and width, its past running from 0 (the prompt's call) to the longest
    sequence."""
    if len(dims) == 2:
        return shapes.min, shapes.opt, shapes.max
    if len(dims) == 4:
        _, heads, _, width = dims
        pasts = ((shapes.min[0], 0), shapes.opt, shapes.max)
        return tuple((batch, heads, past, width) for batch, past in pasts)
    raise StageUnavailable(f"no optimisation profile for an input of shape {dims}")


def build_engine(onnx_path: Path, engine_path: Path, cache_path: Path, log_path: Path, shapes: ShapeRange) -> None:
    """Parse ``onnx_path`` into a strongly typed network and write the serialized engine and timing cache."""
    trt = require_tensorrt()
    log_lines: list[str] = []

    class FileLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:  # TensorRT's ILogger signature
            log_lines.append(f"[{severity}] {msg}")

    logger = FileLogger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    try:
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise StageUnavailable(f"TensorRT could not parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            profile.set_shape(tensor.name, *input_profile(tuple(tensor.shape), shapes))
        config.add_optimization_profile(profile)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise StageUnavailable(f"TensorRT failed to build an engine from {onnx_path.name}; see the build log")
        engine_path.write_bytes(bytes(engine))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    finally:
        log_path.write_text("\n".join(log_lines) + "\n", encoding="utf-8")
