"""`python -m lightning_project.show_batch`: look at what the network is fed before training on it.

Builds the data module exactly as `train` does (same overrides, same normalisation for the chosen
model), draws `show_batch.num_images` samples as the training loader draws them (class sampler,
augmentation, MixUp/CutMix) and writes a grid with each sample's label: the class name, or the two
mixed classes with their weights. Undoes the normalisation for display only.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from lightning_project.errors import UserError
from lightning_project.models.backbones import normalization
from lightning_project.train import build_datamodule, run_dir
from lightning_project.utils import runtime
from lightning_project.utils.summary import subplots

log = logging.getLogger("lightning_project")


def label_text(target: torch.Tensor, classes: list[str]) -> str:
    """A class name, or for mixed targets (class probabilities) the two largest with their weights."""
    if target.ndim == 0:
        return classes[int(target)]
    weights, index = target.topk(min(2, len(classes)))
    if weights[0] >= 0.999:
        return classes[int(index[0])]
    return " / ".join(f"{classes[int(i)]} {float(w):.2f}" for w, i in zip(weights, index) if w > 0.001)


def plot_batch(images: torch.Tensor, titles: list[str], mean, std, columns: int, path: Path) -> None:
    pixels = (images.float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    rows = math.ceil(len(images) / columns)
    fig, axes = subplots(rows, columns, figsize=(1.8 * columns, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, pixels, titles):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def show_batch(cfg: DictConfig) -> tuple[Path, list[str]]:
    """Writes the grid; returns its path and the sample titles."""
    runtime.setup(cfg.seed, cfg.matmul_precision)
    opts = cfg.show_batch
    if opts.split not in ("train", "val", "test"):
        raise UserError(f"show_batch.split={opts.split}: choose train, val or test")
    for key in ("num_images", "columns"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise UserError(f"show_batch.{key}={opts[key]!r}: must be a positive integer")
    mean, std = normalization(cfg.model.name, cfg.model.weights)
    datamodule = build_datamodule(cfg, mean, std)
    images, targets = datamodule.sample_batch(opts.split, opts.num_images, seed=cfg.seed or 0)
    titles = [label_text(t, datamodule.classes) for t in targets]
    path = Path(opts.output) if opts.output else run_dir() / "batch.png"
    plot_batch(images, titles, mean, std, min(opts.columns, len(images)), path)
    log.info("%d %s samples (%dx%d) written to %s", len(images), opts.split, images.shape[-1], images.shape[-2], path)
    return path, titles


@hydra.main(version_base="1.3", config_path="../conf", config_name="show_batch")
def main(cfg: DictConfig) -> None:
    with runtime.user_errors():
        show_batch(cfg)


if __name__ == "__main__":
    main()
