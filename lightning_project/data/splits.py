"""Stratified train/val/test splits, reproducible from a seed."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

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


def kfold_split(
    labels: np.ndarray, fold: int, num_folds: int, test_fraction: float, seed: int, folds: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, val, test) for fold `fold` of a k-fold cross-validation.

    The test part is carved first from the same seed, so every fold is tested on the same images;
    the rest is cut into `num_folds` stratified folds (or by the given `folds` numbers, e.g. a
    table's fold column) and fold `fold` is the validation part.
    """
    if folds is None and (not isinstance(num_folds, int) or num_folds < 2):
        raise UserError(f"data.num_folds={num_folds!r}: k-fold cross-validation needs at least 2 folds")
    count = len(np.unique(folds)) if folds is not None else num_folds
    if not isinstance(fold, int) or not 0 <= fold < count:
        raise UserError(f"data.fold={fold!r}: choose a fold in 0..{count - 1}")
    rest, _, test = stratified_split(labels, 0.0, test_fraction, seed)
    if folds is not None:
        numbers = sorted(int(v) for v in np.unique(folds))
        if numbers != list(range(len(numbers))):
            raise UserError(f"data.fold_column: folds are {numbers}; number them 0..k-1")
        in_fold = folds[rest] == fold
        return np.sort(rest[~in_fold]), np.sort(rest[in_fold]), test
    cv = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    try:
        train, val = list(cv.split(np.zeros(len(rest)), labels[rest]))[fold]
    except ValueError as e:
        raise UserError(f"data.num_folds={num_folds} on {len(rest)} images: {e}; use fewer folds") from None
    return np.sort(rest[train]), np.sort(rest[val]), test
