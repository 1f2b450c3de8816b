"""Training-curve plots for the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = {
    "student_discrepancy": "student (SAM descent)",
    "generator_discrepancy": "generator (ascent)",
    "prior": "generator priors",
    "sharpness": "sharpness-aware term",
}


def plot_losses(history: dict[str, Any], path: Path, title: str) -> None:
    """One line per non-empty curve of a SAM-SGA history, log scale."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in CURVES.items():
        values = history.get(key) or []
        if values:
            ax.plot(range(1, len(values) + 1), values, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
