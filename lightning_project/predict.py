"""`python -m lightning_project.predict ckpt_path=P input=DIR_OR_FILE_OR_GLOB output=preds.csv`.

One row per image: path, predicted class, confidence, the next classes with their probabilities,
and an error column (a file that does not decode is listed with its reason, not fatal). Several
checkpoints (`ckpt_paths`, `sweep_dir`) are averaged; `tta=flip|five_crop|ten_crop` averages views.
The notebook version is `lightning_project.inference.predict_images`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_project.data.datamodules import resolve_workers
from lightning_project.errors import UserError
from lightning_project.inference import Predictor, checkpoint_paths, expand_inputs, predict_files, write_predictions
from lightning_project.utils import runtime
from lightning_project.utils.config import plain

log = logging.getLogger("lightning_project")


def load_predictor(cfg: DictConfig) -> Predictor:
    """The checkpoints named by conf/checkpoints (ckpt_path | ckpt_paths | sweep_dir + top_k), tta, device."""
    sources = checkpoint_paths(cfg.get("ckpt_path"), plain(cfg.get("ckpt_paths")), cfg.get("sweep_dir"), cfg.top_k)
    return Predictor.load(sources, cfg.tta, cfg.device)


def positive(cfg: DictConfig, key: str) -> int:
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{key}={value!r}: give a whole number >= 1")
    return value


def predict(cfg: DictConfig) -> list[dict]:
    runtime.quiet_library_noise()
    batch_size, top_k = positive(cfg, "batch_size"), positive(cfg, "top_classes")
    paths = expand_inputs(plain(cfg.input))  # before any model is read
    out = Path(cfg.output) if cfg.get("output") else Path(HydraConfig.get().runtime.output_dir) / "predictions.csv"
    if out.is_dir():
        raise UserError(f"output={out}: a folder; give a file name ending in .csv or .json")
    workers = min(resolve_workers(cfg.num_workers, "num_workers"), math.ceil(len(paths) / batch_size))
    predictor = load_predictor(cfg)
    log.info("predicting %d images with %s on %s", len(paths), predictor.metadata()["model_name"], predictor.device)
    rows = predict_files(predictor, paths, batch_size, workers, top_k, cfg.progress)
    write_predictions(rows, out, top_k)
    failed = [r for r in rows if r["error"]]
    if failed:
        log.warning("%d of %d files could not be read (listed with their reason): first %s (%s)",
                    len(failed), len(rows), failed[0]["path"], failed[0]["error"])
    log.info("predictions for %d images written to %s", len(rows), out)
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    with runtime.user_errors():
        predict(cfg)


if __name__ == "__main__":
    main()
