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
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from lightning_project.data import datasets, mixing, sampling
from lightning_project.data.images import check_files
from lightning_project.data.splits import kfold_split, stratified_split
from lightning_project.data.transforms import build_pipeline
from lightning_project.errors import UserError
from lightning_project.utils.imports import resolve

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


def resolve_workers(num_workers: int | str, key: str = "data.num_workers") -> int:
    if num_workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"{key}={num_workers!r}: give a count >= 0 or auto (= usable cores)")
    return num_workers


class ImageDataModule(pl.LightningDataModule):
    """Common part of every data set: stratified splits, train/eval pipelines, loaders.

    num_classes: expected class count (None = whatever the data holds; a mismatch is an error).
    train_transforms / eval_transforms: pipeline specs (see data/transforms.py), normalised with mean/std.
    fold / num_folds: k-fold cross-validation; validate on fold `fold` (0-based) of `num_folds`.
    sampler: None | balanced | sqrt: class-balanced sampling of training batches (with replacement).
    shuffle: reshuffle the training set every epoch (when no sampler is set).
    mixup_alpha / cutmix_alpha / mix_prob: MixUp/CutMix of training batches (targets become probabilities).
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
        fold: int | None = None,
        num_folds: int = 5,
        sampler: str | None = None,
        shuffle: bool = True,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        for key, value in (("data.batch_size", batch_size), ("data.eval_batch_size", eval_batch_size or 1)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{key}={value!r}: must be a positive integer")
        sampling.check_sampler(sampler)
        mixing.mixer(2, mixup_alpha, cutmix_alpha, mix_prob)  # checks the values now; built in prepare()
        self.num_workers = resolve_workers(num_workers)
        mean, std = mean or [0.0, 0.0, 0.0], std or [1.0, 1.0, 1.0]
        self.train_transform = build_pipeline(train_transforms, mean, std, "augment.train")
        self.eval_transform = build_pipeline(eval_transforms, mean, std, "augment.eval")
        self.classes: list[str] = []
        self.counts: dict[str, int] = {}  # images per split
        self.class_counts: dict[str, dict[str, int]] = {}  # images per split and class
        self.mixer: mixing.BatchMixer | None = None  # collate_fn of the training loader, when mixing
        self._items: dict[str, tuple[Any, np.ndarray]] | None = None
        self._datasets: dict[str, Dataset] = {}

    # ---- what subclasses provide -------------------------------------------------------------
    def load(self) -> tuple[dict[str, tuple[Any, np.ndarray]], list[str]]:
        """{split: (items, labels)} for the splits the source has, and the class names."""
        raise NotImplementedError

    def make_dataset(self, items: Any, labels: np.ndarray, transform) -> Dataset:
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------------
    def split(
        self, items: Any, labels: np.ndarray, splits=("val", "test"), folds: np.ndarray | None = None,
        classes: list[str] | None = None,
    ) -> dict[str, tuple[Any, np.ndarray]]:
        """Stratified train parts plus the `splits` carved out by their fractions (from the same seed);
        with data.fold, the validation part is that fold of a k-fold split (`folds`: given fold numbers)."""
        fraction = {s: self.hparams[f"{s}_fraction"] if s in splits else 0.0 for s in ("val", "test")}
        if folds is not None and self.hparams.fold is not None and fraction["test"] > 0:
            # a random test share would cut across the table's folds (often groups: one patient, one site)
            log.warning("data.fold_column: the table's folds define the split, data.test_fraction=%s is ignored "
                        "(testing on the validation fold)", fraction["test"])
            fraction["test"] = 0.0
        names = classes or [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
        counts = np.bincount(labels, minlength=len(names))
        few = [f"{n} ({c})" for n, c in zip(names, counts) if c < 2]
        if few and (fraction["val"] > 0 or fraction["test"] > 0 or self.hparams.fold is not None):
            skipped = " after skipping unreadable files" if getattr(self, "bad_files", None) else ""
            raise UserError(f"classes {', '.join(few)} have fewer than 2 images{skipped}: a stratified split needs "
                            "at least 2 per class; add images or remove those classes")
        if self.hparams.fold is None:
            train, val, test = stratified_split(labels, fraction["val"], fraction["test"], self.hparams.seed)
        elif "val" not in splits:
            raise UserError(f"data.fold={self.hparams.fold}: the data has its own validation split (a val/ folder); "
                            "merge it into train/ for k-fold cross-validation, or set data.fold=null")
        else:
            train, val, test = kfold_split(labels, self.hparams.fold, self.hparams.num_folds, fraction["test"],
                                           self.hparams.seed, folds)
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
            self.class_counts = {
                s: dict(zip(classes, np.bincount(labels, minlength=len(classes)).tolist()))
                for s, (_, labels) in items.items()
            }
            empty = [c for c, n in self.class_counts["train"].items() if n == 0]
            if empty:
                raise UserError(f"classes {empty} have no training images; add images or remove the classes")
            for split in ("val", "test") if items["test"] is not items["val"] else ("val",):
                missing = [c for c, n in self.class_counts[split].items() if n == 0]  # too few to split, or
                if missing and rank_zero_only.rank == 0:  # absent from a split folder: metrics missing, not zero
                    log.warning("classes %s have no %s images; their %s metrics are missing", missing, split, split)
            h = self.hparams
            self.mixer = mixing.mixer(len(classes), h.mixup_alpha, h.cutmix_alpha, h.mix_prob)
        return self.classes

    def class_info(self) -> dict:
        """The class-to-index map and the images per split and class (saved in the run directory)."""
        return {
            "classes": self.classes,
            "class_to_idx": {c: i for i, c in enumerate(self.classes)},
            "counts": self.class_counts,
        }

    def fingerprint(self, split: str) -> str:
        """A digest of the split's items (file paths, or the image tensors) and labels, in order: two
        data modules with equal fingerprints feed the same images (compared before averaging models)."""
        import hashlib

        assert self._items is not None
        items, labels = self._items[split]
        digest = hashlib.sha1(np.ascontiguousarray(labels).tobytes())
        if torch.is_tensor(items):
            digest.update(items.contiguous().numpy().tobytes())
        else:
            digest.update("\n".join(map(str, items)).encode())
        return digest.hexdigest()

    def check_transforms(self) -> None:
        """Run both pipelines on one training image: a transform that accepts its arguments but fails
        on an image (a wrong size type, an op that needs a float tensor before normalisation) fails now,
        with the key to fix, not in a loader worker after the model is built."""
        assert self._items is not None
        items, labels = self._items["train"]
        sample = self.make_dataset(items[:1], labels[:1], None)[0][0]
        for key, pipeline in (("augment.train", self.train_transform), ("augment.eval", self.eval_transform)):
            try:
                with torch.random.fork_rng(devices=[]):  # the check draws no random number of the run's
                    out = pipeline(sample)
            except Exception as e:
                raise UserError(f"{key}: the pipeline fails on a training image ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}); fix the step's arguments") from None
            size = self.hparams.image_size
            if tuple(out.shape[-2:]) != (size, size):  # images of other sizes would not stack into batches
                raise UserError(f"{key} yields {out.shape[-2]}x{out.shape[-1]} images, augment.image_size is {size}: "
                                f"end {key} with a crop to {size} (e.g. CenterCrop or RandomResizedCrop)")

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        assert self._items is not None
        for split, (items, labels) in self._items.items():
            if split not in self._datasets:
                transform = self.train_transform if split == "train" else self.eval_transform
                self._datasets[split] = self.make_dataset(items, labels, transform)

    def _loader(self, split: str, train: bool) -> DataLoader:
        workers = self.num_workers
        pin = bool(self.hparams.pin_memory)
        if self.hparams.pin_memory == "auto":  # pinned host memory helps copies to a GPU only
            trainer = getattr(self, "trainer", None)
            pin = torch.cuda.is_available() and not isinstance(getattr(trainer, "accelerator", None), CPUAccelerator)
        batch = self.hparams.batch_size if train else (self.hparams.eval_batch_size or self.hparams.batch_size)
        sampler = None
        if train and self.hparams.sampler:
            sampler = sampling.class_sampler(self._items[split][1], len(self.classes), self.hparams.sampler)
        trainer = getattr(self, "trainer", None)
        if train and sampler is None and not self.hparams.shuffle and trainer is not None and trainer.world_size > 1:
            # Lightning shards a training set with a shuffling DistributedSampler whatever the loader said
            sampler = DistributedSampler(self._datasets[split], trainer.world_size, trainer.global_rank, shuffle=False)
        return DataLoader(
            self._datasets[split],
            batch_size=batch,
            shuffle=train and sampler is None and self.hparams.shuffle,
            sampler=sampler,
            collate_fn=self.mixer if train else None,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=bool(self.hparams.persistent_workers and workers > 0),
            drop_last=train and len(self._datasets[split]) > batch,  # no tiny last batch through BatchNorm
        )

    def sample_batch(self, split: str = "train", n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` samples of `split` drawn as its loader draws them (training: the sampler, augmentation and
        MixUp/CutMix), reproducible from `seed`; for looking at what the network is fed."""
        self.setup("fit")
        dataset, labels = self._datasets[split], self._items[split][1]
        generator = torch.Generator().manual_seed(seed)
        if split == "train" and self.hparams.sampler:
            sampler = sampling.class_sampler(labels, len(self.classes), self.hparams.sampler, generator)
            indices = list(sampler)[:n]
        else:
            indices = torch.randperm(len(dataset), generator=generator)[:n].tolist()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the random augmentations and mixing draws
            samples = [dataset[i] for i in indices]
            return (self.mixer if split == "train" and self.mixer else default_collate)(samples)

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
    datamodule.check_transforms()
    return datamodule


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 hand-written digits (10 classes, 1,797 images): offline, for smoke runs."""

    def load(self):
        images, labels, classes = datasets.digits()
        return self.split(images, labels, classes=classes), classes

    def make_dataset(self, items, labels, transform):
        return datasets.TensorImageDataset(items, labels, transform)


class FileDataModule(ImageDataModule):
    """Images as files. Before any training, every file is checked to decode (on all cores, JPEGs at
    1/8 scale) so that no bad file fails later inside a loader worker.

    on_bad_file: error (one line listing them) | skip (warn with the count, train on the rest).
    check_images: false checks only that the files exist (for large data sets known to be clean).
    """

    def __init__(self, on_bad_file: str = "error", check_images: bool = True, **kwargs) -> None:
        if on_bad_file not in ("error", "skip"):
            raise UserError(f"data.on_bad_file={on_bad_file!r}: choose error (stop and list them) or skip")
        super().__init__(**kwargs)
        self.bad_files: dict[str, str] = {}  # path -> why it was skipped

    def readable(self, paths: list[str], where: str) -> np.ndarray:
        """Indices of the files of `paths` that decode; the others are an error or skipped (logged)."""
        if self.hparams.check_images:
            cores = resolve_workers("auto")
            bad = check_files(paths, cores, progress=rank_zero_only.rank == 0)
        else:
            bad = {p: "no such file" for p in paths if not os.path.isfile(p)}
        if not bad:
            return np.arange(len(paths))
        shown = "; ".join(f"{p} ({why})" for p, why in list(bad.items())[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        if self.hparams.on_bad_file == "error":
            raise UserError(f"{where}: {len(bad)} of {len(paths)} files are not readable images: {shown}{more}; "
                            "fix or delete them, or set data.on_bad_file=skip")
        log.warning("%s: skipping %d of %d files that are not readable images: %s%s", where, len(bad), len(paths),
                    shown, more)
        self.bad_files.update(bad)
        return np.asarray([i for i, p in enumerate(paths) if p not in bad], dtype=np.int64)

    def make_dataset(self, items, labels, transform):
        return datasets.ImageFileDataset(items, labels, transform)


class ImageFolderDataModule(FileDataModule):
    """`root/<class>/*.jpg`; or `root/train|val|test/<class>/...`, where a missing split is carved from train."""

    def __init__(self, root: str | None = None, **kwargs) -> None:
        if not root:
            raise UserError("data.root is not set: data=imagefolder needs data.root=DIR (one sub-folder per class)")
        super().__init__(**kwargs)
        self.root = Path(root)

    def _scan(self, folder: Path, where: str, classes: list[str] | None = None):
        paths, labels, classes = datasets.scan_folder(folder, where, classes)
        keep = self.readable(paths, f"{where}={folder}")
        return [paths[i] for i in keep], labels[keep], classes

    def load(self):
        base = self.root / "train" if (self.root / "train").is_dir() else self.root
        paths, labels, classes = self._scan(base, "data.root")
        if base == self.root:  # one pool of images
            return self.split(paths, labels, classes=classes), classes
        on_disk = [s for s in ("val", "test") if (self.root / s).is_dir()]
        parts = self.split(paths, labels, splits=[s for s in ("val", "test") if s not in on_disk], classes=classes)
        for s in on_disk:
            parts[s] = self._scan(self.root / s, f"data.root ({s}/)", classes)[:2]
        return parts, classes


class CSVDataModule(FileDataModule):
    """A table of image paths and labels (`data.csv`), paths relative to `root` (default: the table's
    folder). With `data.fold` and a fold column, validation is the rows of that fold."""

    def __init__(
        self,
        csv: str | None = None,
        root: str | None = None,
        path_column: str | None = None,
        label_column: str | None = None,
        fold_column: str | None = "fold",
        extension: str | None = None,
        **kwargs,
    ) -> None:
        if not csv:
            raise UserError("data.csv is not set: data=csv needs data.csv=FILE (columns: image path, label)")
        super().__init__(**kwargs)
        self.table = dict(csv_path=csv, root=root, path_column=path_column, label_column=label_column,
                          fold_column=fold_column, extension=extension)

    def load(self):
        paths, labels, classes, folds = datasets.read_table(**self.table)
        keep = self.readable(paths, f"data.csv={self.table['csv_path']}")
        paths, labels = [paths[i] for i in keep], labels[keep]
        return self.split(paths, labels, folds=None if folds is None else folds[keep], classes=classes), classes


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
        parts = self.split(images, labels, classes=classes)
        test_images, test_labels, _ = datasets.cifar10(self.root, False, self.download)
        parts["test"] = (test_images, test_labels)
        return parts, classes

    def make_dataset(self, items, labels, transform):
        return datasets.TensorImageDataset(items, labels, transform)
