"""Predictions for image files: batched through a DataLoader, decoding in workers, bad files as rows.

A plain loop rather than `Trainer.predict`: an ensemble is several modules with their own
pipelines, and an unreadable file must become a row with its reason, not stop the run; Lightning
would add a wrapper module, a log directory and a strategy for no gain in a forward-only pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # text bars: tqdm.auto would need ipywidgets in notebooks

from lightning_project.data.images import load_image
from lightning_project.inference.predictor import Predictor, Preprocess, top_classes


class _Files(Dataset):
    def __init__(self, paths: list[Path], preprocess: Preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_image(self.paths[i])), None
        except Exception as e:  # PIL raises many types; the reason goes into the file's row
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return i, None, reason.replace(str(self.paths[i]), "").strip(" '") or type(e).__name__


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    inputs = tuple(torch.stack(views) for views in zip(*(x for _, x in good))) if good else ()
    return [i for i, _ in good], inputs, [(i, err) for i, _, err in items if err is not None]


def predict_files(
    predictor: Predictor, paths: list[Path], batch_size: int = 64, num_workers: int = 0, top_k: int = 3,
    progress: bool = True,
) -> list[dict]:
    """One dict per path, in order: path, class, confidence, top (k (class, probability) pairs), error."""
    rows: list[dict] = [{}] * len(paths)
    loader = DataLoader(_Files(paths, predictor.preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, pin_memory=predictor.device.type == "cuda")
    for indices, inputs, errors in tqdm(loader, desc="predicting", unit="batch", disable=not progress or None):
        for i, error in errors:
            rows[i] = {"path": str(paths[i]), "class": None, "confidence": None, "top": [], "error": error}
        if not indices:
            continue
        for i, top in zip(indices, top_classes(predictor.probabilities(inputs), predictor.classes, top_k)):
            rows[i] = {"path": str(paths[i]), "class": top[0][0], "confidence": top[0][1], "top": top, "error": None}
    return rows


def write_predictions(rows: list[dict], path: Path, top_k: int) -> None:
    """`.json`: the rows as a list; anything else: CSV with path, class, confidence, the next k-1
    classes and probabilities (class_2, confidence_2, ...) and error (empty when the file was read)."""
    import csv
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        plain = [{**r, "top": [{"class": c, "probability": p} for c, p in r["top"]]} for r in rows]
        path.write_text(json.dumps(plain, indent=2) + "\n")
        return
    extra = [f"{what}_{j}" for j in range(2, top_k + 1) for what in ("class", "confidence")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "confidence", *extra, "error"])
        for r in rows:
            ranked = [v for c, p in r["top"][1:] for v in (c, f"{p:.6f}")]
            ranked += [""] * (len(extra) - len(ranked))
            confidence = "" if r["confidence"] is None else f"{r['confidence']:.6f}"
            writer.writerow([r["path"], r["class"] or "", confidence, *ranked, r["error"] or ""])
