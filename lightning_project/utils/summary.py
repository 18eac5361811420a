"""What a run leaves behind besides checkpoints: metrics.json, curves.png, confusion_matrix.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def _number(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def jsonable(value: Any) -> Any:
    """`value` with NaN/inf floats as None, recursively: json.dumps would write bare NaN (invalid
    JSON) for plain floats, which its `default` hook never sees (a diverged loss, a collapsed run)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2, default=_number, allow_nan=False) + "\n")


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Train and validation loss and accuracy by epoch, side by side; the gap shows overfitting."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    epochs = [int(row["epoch"]) + 1 for row in history]
    for ax, metric in zip(axes, ("loss", "acc")):
        for split, style in (("train", "o-"), ("val", "s-")):
            key = f"{split}/{metric}"
            points = [(e, row[key]) for e, row in zip(epochs, history) if key in row]
            if points:
                ax.plot(*zip(*points), style, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        values = [row[k] for row in history for k in (f"train/{metric}", f"val/{metric}") if k in row]
        if metric == "loss" and values and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")  # an early spike would flatten the rest of the curve
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix, class_names: list[str], path: Path) -> None:
    """Test-set confusion matrix: counts, rows = true class, columns = predicted class."""
    matrix = [[int(v) for v in row] for row in matrix.tolist()]
    n = len(class_names)
    size = min(4 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), constrained_layout=True)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, v, ha="center", va="center", fontsize=8, color="white" if v > peak / 2 else "black")
    ax.set_title("confusion matrix (test)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
