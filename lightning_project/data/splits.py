"""Stratified train/val/test splits, reproducible from a seed."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from lightning_project.errors import UserError


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test); every class keeps its share in each part."""
    for key, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{key}={value}: must be in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction}: leaves no training images"
        )
    rest, parts = np.arange(len(labels)), []
    remaining = 1.0
    for fraction in (test_fraction, val_fraction):
        if fraction == 0:
            parts.append(np.array([], dtype=np.int64))
            continue
        try:
            rest, part = train_test_split(
                rest, test_size=fraction / remaining, stratify=labels[rest], random_state=seed
            )
        except ValueError as e:
            raise UserError(
                f"data split (val_fraction={val_fraction}, test_fraction={test_fraction}) of {len(labels)} "
                f"images failed: {e}; add images to the small classes or change the fractions"
            ) from None
        remaining -= fraction
        parts.append(np.sort(part))
    test, val = parts
    return np.sort(rest), val, test
