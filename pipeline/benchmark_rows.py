"""The comparison tables' rows: a procedure (:data:`pipeline.benchmark_cell.PROCEDURES`), a scheme, the
calibration method a learning procedure uses, the families it applies to, and a patch of the task config.
Rows are data (``bench/rows.yaml``); a spec picks them by key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from calib.capabilities import Scheme, unsupported
from calib.registry import METHODS
from pipeline.config import PipelineConfig, build, merge, read_yaml

TaskFamily = Literal["encoder", "decoder"]
Procedure = Literal[
    "fp32",
    "rtn",
    "ort-dynamic",
    "ort-static-minmax",
    "ort-static-entropy",
    "modelopt-int8",
    "ort-int4-rtn",
    "ort-int4-hqq",
    "ptq",
    "qat",
    "zsaq",
]  # pipeline.benchmark_cell's
# Peers' own tools on the FP32 ONNX graph (exporters.peer_graphs): timed as their own CPU graph
PEER_PROCEDURES = ("ort-dynamic", "ort-static-minmax", "ort-static-entropy", "modelopt-int8")


@dataclass(frozen=True)
class Row:
    """One line of a table."""

    key: str
    label: str
    method: Procedure
    weight_bits: int = 32
    act_bits: int = 32
    inputs: Annotated[str, tuple(METHODS)] | None = None
    families: tuple[TaskFamily, ...] = ("encoder", "decoder")
    not_run: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

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
        return self.inputs is not None and METHODS[self.inputs].uses_data

    @property
    def latency_format(self) -> str | None:
        """The exported CPU model whose speed and size this row has (None: no runtime executes the scheme)."""
        if self.method.startswith("ort-static"):
            return "ort-static"  # both calibration methods make the same graph structure: one is timed
        if self.method.startswith("ort-int4"):
            return None  # decoder rows: the decoder table times no CPU formats
        if self.method == "fp32" or self.method in PEER_PROCEDURES:
            return self.method
        if unsupported("onnxruntime", Scheme(self.weight_bits, act_bits=min(self.act_bits, 16))):
            return None  # e.g. 2-bit weights: the student is PyTorch-only
        return f"w{self.weight_bits}a{min(self.act_bits, 16)}"

    def reason_not_run(self, family: TaskFamily) -> str | None:
        """Why this row has no figure for tasks of ``family`` (None: it runs)."""
        if family not in self.families:
            return "n/a"
        return self.not_run.get(family)


def load_rows(path: Path) -> dict[str, Row]:
    """The row catalogue: a YAML list of rows, by key, in file order."""
    entries = read_yaml(path, "row catalogue")
    return {row.key: row for row in build(tuple[Row, ...], entries, str(path), "rows")}


def task_family(config: PipelineConfig) -> TaskFamily:
    """Decoders are causal LMs; every other task kind runs an encoder."""
    return "decoder" if config.task.kind == "causal-lm" else "encoder"


def row_patch(row: Row, seed: int, real_data: str | None) -> dict[str, Any]:
    """The config patch of a row: its own ``config``, then its scheme, calibration method and seed.

    Weights keep the task config's granularity; activations above 8 bits stay in float."""
    scheme = {"quant": {"weights": {"bits": row.weight_bits}, "activations": {"bits": min(row.act_bits, 16)}}}
    calib = {"seed": seed, "method": row.inputs or "zsaq", "real_data": real_data}
    return merge(merge(row.config, scheme if row.weight_bits < 32 else {}), {"calib": calib})
