"""The quantizers a user of this field would try instead of ours, run the way their documentation shows on the
same FP32 ONNX graph: ONNX Runtime's ``quantize_static`` (QDQ, per-channel, calibrated on generated inputs) and
NVIDIA ModelOpt's ONNX post-training quantization (``modelopt.onnx.quantization``, without calibration data or
with generated inputs). Neither sees task data here; the benchmark table scores and times their graphs beside
ours (issue 22)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from calib.inputs import CalibrationSet

StaticMethod = Literal["minmax", "entropy"]
# ModelOpt pulls onnxruntime-gpu, cupy and numpy 2 (PLATFORM-NOTES): it lives in its own environment, called
# as a subprocess. ZSAQ_MODELOPT_PYTHON names its interpreter; else .modelopt-venv beside the project.
MODELOPT_PYTHON_ENV = "ZSAQ_MODELOPT_PYTHON"
MODELOPT_VENV = Path(__file__).resolve().parent.parent / ".modelopt-venv"
MODELOPT_INSTALL = (
    "python3 -m venv .modelopt-venv && .modelopt-venv/bin/pip install torch==2.13.0 && "
    ".modelopt-venv/bin/pip install 'nvidia-modelopt[onnx]'"
)
MODELOPT_TIMEOUT_S = 1800


class PeerUnavailable(RuntimeError):
    """The peer cannot run on this machine; the message says why in one line (and how to install it)."""


Feeds = dict[str, np.ndarray]


def sample_feeds(samples: CalibrationSet) -> list[Feeds]:
    """One ONNX feed per calibration sample (token ids and mask), as the peers' calibration readers take them."""
    if samples.input_ids is None:
        raise ValueError("an ONNX peer calibrates on token ids; these samples are embeddings")
    return [{"input_ids": b.input_ids.numpy(), "attention_mask": b.attention_mask.numpy()} for b in samples.batches(1)]


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[Feeds]) -> None:
        self._all = feeds
        self._feeds: Iterator[Feeds] = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._feeds, None)

    def rewind(self) -> None:
        self._feeds = iter(self._all)


def ort_static_graph(fp32: Path, out: Path, feeds: list[Feeds], method: StaticMethod) -> None:
    """ONNX Runtime's static QDQ quantization as its documentation shows it: ``quant_pre_process`` (symbolic
    shape inference skipped: it fails on these graphs), then ``quantize_static`` with per-channel int8 weights and
    uint8 activations (the layout ORT's CPU kernels fuse) calibrated by ``method`` on ``feeds``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[method]
    with tempfile.TemporaryDirectory(prefix="zsaq-ort-static-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            _FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibration,
        )


def modelopt_python() -> Path:
    """ModelOpt's interpreter, or :class:`PeerUnavailable` saying how to install it."""
    given = os.environ.get(MODELOPT_PYTHON_ENV)
    python = Path(given) if given else MODELOPT_VENV / "bin" / "python"
    if not python.is_file():
        raise PeerUnavailable(f"nvidia-modelopt is not installed (its own environment: {MODELOPT_INSTALL})")
    return python


def modelopt_graph(fp32: Path, out: Path, mode: Literal["int8", "int4"], feeds: list[Feeds] | None) -> None:
    """ModelOpt's ONNX PTQ (``python -m modelopt.onnx.quantization``) on the CPU calibration provider. Without
    ``feeds`` it calibrates on its own random sample; with them, on their stacked arrays (one .npz). ModelOpt
    rewrites its input in place (shape inference): it gets a copy."""
    python = modelopt_python()
    with tempfile.TemporaryDirectory(prefix="zsaq-modelopt-") as tmp:
        source = Path(tmp) / "model.onnx"
        shutil.copyfile(fp32, source)
        command = [str(python), "-m", "modelopt.onnx.quantization", "--onnx_path", str(source)]
        command += ["--quantize_mode", mode, "--calibration_eps", "cpu", "--output_path", str(out)]
        command += ["--high_precision_dtype", "fp32"]  # its default fp16 is for TensorRT, not ORT's CPU kernels
        if feeds:
            data = Path(tmp) / "calibration.npz"
            np.savez(data, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
            command += ["--calibration_data_path", str(data)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=MODELOPT_TIMEOUT_S, check=False)
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PeerUnavailable(f"modelopt.onnx.quantization --quantize_mode {mode} failed: {last[0][:300]}")


# The peers' CPU graphs timed in the benchmark's latency run (both quantize_static methods make the same graph
# structure, so one of them is timed for both rows)
PEER_FORMATS = ("ort-static", "modelopt-int8")


def peer_format_graphs(fp32: Path, folder: Path, feeds: list[Feeds]) -> tuple[dict[str, Path], dict[str, str]]:
    """Each of :data:`PEER_FORMATS` made from ``fp32`` into ``folder`` (ranges from ``feeds``: latency does not
    depend on them), and why any could not be made."""
    paths: dict[str, Path] = {}
    unavailable: dict[str, str] = {}
    for name in PEER_FORMATS:
        path = folder / f"{name}.onnx"
        try:
            if name == "ort-static":
                ort_static_graph(fp32, path, feeds, "minmax")
            else:
                modelopt_graph(fp32, path, "int8", feeds)
        except PeerUnavailable as exc:
            unavailable[name] = str(exc)
        else:
            paths[name] = path
    return paths, unavailable


Int4Method = Literal["rtn", "hqq"]


def ort_int4_graph(fp32: Path, out: Path, method: Int4Method, block_size: int) -> None:
    """ONNX Runtime's own data-free int4 (``MatMulNBitsQuantizer``) of every MatMul on a constant weight but the LM
    head (the students keep theirs float too): ``rtn``, its default affine round-to-nearest (asymmetric, a zero
    point per block), or ``hqq`` (half-quadratic optimisation of scale and zero point), blocks of ``block_size``."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if method == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=4)
    model = onnx.load(str(fp32))
    head = [node.name for node in model.graph.node if node.op_type == "MatMul" and "lm_head" in node.name]
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=head, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
