"""LightningDataModules: splits, augmentation pipelines and loaders; subclasses say where images come from.

`prepare()` reads the labels and checks the data (cheap: no decoding) so that a missing folder or
an empty class is reported before any model is built; Lightning's `setup()` then builds the
datasets. A checkpoint stores the class path and Lightning stores the arguments, so evaluation
rebuilds the same data module, splits included.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_project.data import datasets
from lightning_project.data.splits import stratified_split
from lightning_project.data.transforms import build_pipeline
from lightning_project.errors import UserError
from lightning_project.utils.imports import resolve

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


def resolve_workers(num_workers: int | str) -> int:
    if num_workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"data.num_workers={num_workers!r}: give a count >= 0 or auto (= usable cores)")
    return num_workers


class ImageDataModule(pl.LightningDataModule):
    """Common part of every data set: stratified splits, train/eval pipelines, loaders.

    num_classes: expected class count (None = whatever the data holds; a mismatch is an error).
    train_transforms / eval_transforms: pipeline specs (see data/transforms.py), normalised with mean/std.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | str = "auto",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        train_transforms: Any = None,
        eval_transforms: Any = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        pin_memory: bool | str = "auto",
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        for key, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size or 1)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{key}={value!r}: must be a positive integer")
        self.num_workers = resolve_workers(num_workers)
        mean, std = mean or [0.0, 0.0, 0.0], std or [1.0, 1.0, 1.0]
        self.train_transform = build_pipeline(train_transforms, mean, std, "augment.train")
        self.eval_transform = build_pipeline(eval_transforms, mean, std, "augment.eval")
        self.classes: list[str] = []
        self.counts: dict[str, int] = {}
        self._items: dict[str, tuple[Any, np.ndarray]] | None = None
        self._datasets: dict[str, Dataset] = {}

    # ---- what subclasses provide -------------------------------------------------------------
    def load(self) -> tuple[dict[str, tuple[Any, np.ndarray]], list[str]]:
        """{split: (items, labels)} for the splits the source has, and the class names."""
        raise NotImplementedError

    def make_dataset(self, items: Any, labels: np.ndarray, transform) -> Dataset:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------
    def split(self, items: Any, labels: np.ndarray, splits=("val", "test")) -> dict[str, tuple[Any, np.ndarray]]:
        """Stratified train parts plus the `splits` carved out by their fractions (from the same seed)."""
        fraction = {s: self.hparams[f"{s}_fraction"] if s in splits else 0.0 for s in ("val", "test")}
        train, val, test = stratified_split(labels, fraction["val"], fraction["test"], self.hparams.seed)
        take = (lambda idx: items[torch.as_tensor(idx)]) if torch.is_tensor(items) else (
            lambda idx: [items[i] for i in idx]
        )
        parts = dict(zip(SPLITS, (train, val, test)))
        return {name: (take(idx), labels[idx]) for name, idx in parts.items() if name == "train" or name in splits}

    def prepare(self) -> list[str]:
        """Read labels and check the data (once); returns the class names."""
        if self._items is None:
            items, classes = self.load()
            expected = self.hparams.num_classes
            if expected is not None and expected != len(classes):
                raise UserError(
                    f"data.num_classes={expected} but the data holds {len(classes)} classes "
                    f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); set data.num_classes=null"
                )
            if "val" not in items or len(items["val"][1]) == 0:
                raise UserError("the validation split is empty: set data.val_fraction > 0 or add a val/ folder")
            if "test" not in items or len(items["test"][1]) == 0:
                log.warning("no test images (data.test_fraction=0, no test/ folder): testing on the validation split")
                items["test"] = items["val"]
            self._items, self.classes = items, classes
            self.counts = {s: int(len(labels)) for s, (_, labels) in items.items()}
        return self.classes

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        assert self._items is not None
        for split, (items, labels) in self._items.items():
            if split not in self._datasets:
                transform = self.train_transform if split == "train" else self.eval_transform
                self._datasets[split] = self.make_dataset(items, labels, transform)

    def _loader(self, split: str, train: bool) -> DataLoader:
        workers = self.num_workers
        pin = torch.cuda.is_available() if self.hparams.pin_memory == "auto" else bool(self.hparams.pin_memory)
        batch = self.hparams.batch_size if train else (self.hparams.eval_batch_size or self.hparams.batch_size)
        return DataLoader(
            self._datasets[split],
            batch_size=batch,
            shuffle=train,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=bool(self.hparams.persistent_workers and workers > 0),
            drop_last=train and len(self._datasets[split]) > batch,  # no tiny last batch through BatchNorm
        )

    def eval_dataloader(self, split: str) -> DataLoader:
        """Any split in order, batched like evaluation (e.g. to compute features once)."""
        return self._loader(split, train=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)



def create_datamodule(target: str, **kwargs) -> ImageDataModule:
    """The data module class `target` (import path) built with `kwargs`, its labels read and checked."""
    cls = resolve(target, sys.modules[__name__], "data._target_")
    if not (isinstance(cls, type) and issubclass(cls, ImageDataModule)):
        raise UserError(f"data._target_={target}: not an ImageDataModule")
    try:
        datamodule = cls(**kwargs)
    except TypeError as e:
        raise UserError(f"data: {e}; see conf/data/*.yaml for the keys") from None
    datamodule.prepare()
    return datamodule


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 hand-written digits (10 classes, 1,797 images): offline, for smoke runs."""

    def load(self):
        images, labels, classes = datasets.digits()
        return self.split(images, labels), classes

    def make_dataset(self, items, labels, transform):
        return datasets.TensorImageDataset(items, labels, transform)


class ImageFolderDataModule(ImageDataModule):
    """`root/<class>/*.jpg`; or `root/train|val|test/<class>/...`, where a missing split is carved from train."""

    def __init__(self, root: str | None = None, **kwargs) -> None:
        if not root:
            raise UserError("data.root is not set: data=imagefolder needs data.root=DIR (one sub-folder per class)")
        super().__init__(**kwargs)
        self.root = Path(root)

    def load(self):
        base = self.root / "train" if (self.root / "train").is_dir() else self.root
        paths, labels, classes = datasets.scan_folder(base, "data.root")
        if base == self.root:  # one pool of images
            return self.split(paths, labels), classes
        on_disk = [s for s in ("val", "test") if (self.root / s).is_dir()]
        parts = self.split(paths, labels, splits=[s for s in ("val", "test") if s not in on_disk])
        for s in on_disk:
            parts[s] = datasets.scan_folder(self.root / s, f"data.root ({s}/)", classes)[:2]
        return parts, classes

    def make_dataset(self, items, labels, transform):
        return datasets.ImageFileDataset(items, labels, transform)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 from torchvision (downloaded into `root`); validation carved from the training set."""

    def __init__(self, root: str = "data", download: bool = True, **kwargs) -> None:
        kwargs.setdefault("test_fraction", 0.0)
        super().__init__(**kwargs)
        self.root, self.download = str(root), download

    def prepare_data(self) -> None:
        datasets.cifar10(self.root, train=True, download=self.download)
        datasets.cifar10(self.root, train=False, download=self.download)

    def load(self):
        images, labels, classes = datasets.cifar10(self.root, True, self.download)
        parts = self.split(images, labels)
        test_images, test_labels, _ = datasets.cifar10(self.root, False, self.download)
        parts["test"] = (test_images, test_labels)
        return parts, classes

    def make_dataset(self, items, labels, transform):
        return datasets.TensorImageDataset(items, labels, transform)
