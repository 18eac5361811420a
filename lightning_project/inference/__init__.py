"""After training: load checkpoints (alone or as an ensemble), predict image files, export; plain Python.

    from lightning_project.inference import predict_images
    rows = predict_images("logs/train/runs/<time>/checkpoints/best.ckpt", "photos/", tta="flip")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_project.inference.files import predict_files, write_predictions
from lightning_project.inference.inputs import expand_inputs
from lightning_project.inference.predictor import Predictor, checkpoint_paths
from lightning_project.inference.runs import best_runs, find_runs


def predict_images(
    checkpoints: str | Path | Sequence[str | Path], inputs: str | Path | Sequence[str | Path], tta: str = "none",
    device: str = "auto", batch_size: int = 64, num_workers: int = 0, top_k: int = 3, progress: bool = False,
) -> list[dict]:
    """Predictions of one checkpoint (or the average of several) for image files, folders or globs:
    one dict per file with path, class, confidence, top [(class, probability), ...] and error."""
    paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    predictor = Predictor.load(checkpoint_paths(ckpt_paths=[str(p) for p in paths]), tta, device)
    return predict_files(predictor, expand_inputs(inputs), batch_size, num_workers, top_k, progress)


__all__ = ["Predictor", "best_runs", "checkpoint_paths", "expand_inputs", "find_runs", "predict_files",
           "predict_images", "write_predictions"]
