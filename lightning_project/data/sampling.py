"""Class imbalance: a class-balanced sampler and class weights for the loss, from the training counts.

Both take the same modes: `balanced` weighs each class by 1/count (every class equally likely per
draw / equal total loss), `sqrt` by 1/sqrt(count), a milder correction that overfits the rare
classes less when they hold only a handful of images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from lightning_project.errors import UserError

POWERS = {"balanced": 1.0, "auto": 1.0, "sqrt": 0.5}


def _power(mode: str, key: str) -> float:
    if mode not in POWERS:
        raise UserError(f"{key}={mode!r}: choose balanced (1/count), sqrt (1/sqrt(count)) or null (off)")
    return POWERS[mode]


def class_weights(counts: Sequence[int], mode: str | Sequence[float], key: str = "loss.class_weights") -> list[float]:
    """Per-class loss weights: count^-p scaled so that the mean weight over the training samples is 1
    (the loss keeps its scale, so the learning rate needs no change). `balanced` equals
    scikit-learn's `compute_class_weight("balanced")`. A list is taken as given (checked)."""
    counts = np.asarray(counts, dtype=np.float64)
    if not isinstance(mode, str):
        weights = [float(w) for w in mode]
        if len(weights) != len(counts) or min(weights) < 0:
            raise UserError(f"{key}={weights}: give {len(counts)} non-negative weights (one per class) or auto")
        return weights
    raw = counts ** -_power("balanced" if mode == "auto" else mode, key)
    return (raw * counts.sum() / (raw * counts).sum()).tolist()


def check_sampler(mode: str | None) -> None:
    if mode is not None:
        _power(mode, "data.sampler")


def class_sampler(
    labels: np.ndarray, num_classes: int, mode: str, generator: torch.Generator | None = None
) -> WeightedRandomSampler:
    """Draws len(labels) training samples per epoch with replacement, each class with probability
    proportional to count^(1-p): equal for `balanced`. Lightning wraps it for DDP."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    per_class = np.where(counts > 0, np.maximum(counts, 1) ** -_power(mode, "data.sampler"), 0.0)
    weights = torch.as_tensor(per_class[labels])
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True, generator=generator)
