"""What a run leaves behind besides checkpoints: metrics.json, curves.png, confusion_matrix.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


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


def subplots(rows: int = 1, columns: int = 1, **options):
    """A figure and its axes, outside pyplot: written to files only, so no backend is switched and a
    notebook's inline plots keep working, and nothing stays in pyplot's figure registry."""
    fig = Figure(figsize=options.pop("figsize", None), layout="constrained")
    return fig, fig.subplots(rows, columns, **options)


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Train and validation loss and accuracy by epoch, side by side; the gap shows overfitting."""
    fig, axes = subplots(1, 2, figsize=(10, 4))
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


def per_class(matrix, class_names: list[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support of each class, from the test confusion matrix (rows = true
    class) that the run already holds, rather than a second pass with per-class metric objects.
    A class never predicted gets precision 0; a class without test images gets None for all three
    (nothing was measured; torchmetrics' macro average leaves such classes out too)."""
    m = [[int(v) for v in row] for row in matrix.tolist()]
    out = {}
    for i, name in enumerate(class_names):
        hit, support, predicted = m[i][i], sum(m[i]), sum(row[i] for row in m)
        if not support:
            out[name] = {"precision": None, "recall": None, "f1": None, "support": 0}
            continue
        precision = hit / predicted if predicted else 0.0
        recall = hit / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": round(precision, 6), "recall": round(recall, 6), "f1": round(f1, 6),
                     "support": support}
    return out


def plot_confusion(matrix, class_names: list[str], path: Path) -> None:
    """Test-set confusion matrix, rows = true class, columns = predicted class. Cells show counts and
    are coloured by their share of the row (recall on the diagonal), so a rare class's errors are as
    visible as a common one's; each row label carries the class's recall and support."""
    matrix = [[int(v) for v in row] for row in matrix.tolist()]
    n = len(class_names)
    shares = [[v / (sum(row) or 1) for v in row] for row in matrix]
    size = min(4 + 0.45 * n, 24)
    fig, ax = subplots(figsize=(size + 1, size * 0.9))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90 if n > 10 else 0)
    labels = [f"{c} ({shares[i][i]:.0%} of {sum(matrix[i])})" for i, c in enumerate(class_names)]
    ax.set_yticks(range(n), labels if n <= 30 else class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (recall of support)")
    if n <= 30:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, v, ha="center", va="center", fontsize=8, color="white" if shares[i][j] > 0.5 else "black")
    ax.set_title("confusion matrix (test; colour = share of the true class)")
    fig.savefig(path, dpi=100)
