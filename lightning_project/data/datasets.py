"""Where images come from: the embedded digits, class folders on disk, CIFAR-10; and the Dataset types."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors

from lightning_project.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, labels, transform: Callable | None = None) -> None:
        self.images, self.labels, self.transform = images, torch.as_tensor(labels, dtype=torch.long), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = tv_tensors.Image(self.images[i])
        return (self.transform(image) if self.transform else image), self.labels[i]


class ImageFileDataset(Dataset):
    """Image files decoded with PIL: EXIF orientation applied, any mode converted to RGB."""

    def __init__(self, paths: list[str], labels, transform: Callable | None = None) -> None:
        self.paths, self.labels, self.transform = list(paths), torch.as_tensor(labels, dtype=torch.long), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = load_image(self.paths[i])
        return (self.transform(image) if self.transform else image), self.labels[i]


def load_image(path: str | Path) -> Image.Image:
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def digits() -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """scikit-learn's 1,797 hand-written digits (8x8, shipped with the package, no network) as RGB uint8."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = torch.from_numpy(np.round(bunch.images * (255 / 16)).astype(np.uint8))  # values 0..16
    images = gray[:, None].expand(-1, 3, -1, -1).contiguous()
    return images, bunch.target.astype(np.int64), [str(c) for c in bunch.target_names]


def cifar10(root: str, train: bool, download: bool) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """CIFAR-10 through torchvision, stored under `root` (paths.data_dir)."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=root, train=train, download=download)
    except (RuntimeError, OSError) as e:
        raise UserError(
            f"data=cifar10: CIFAR-10 is not under {root} and could not be downloaded ({e}); place "
            f"cifar-10-python.tar.gz (from {CIFAR10.url}) in {root}, or set paths.data_dir"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def scan_folder(
    root: str | Path, where: str = "data.root", classes: list[str] | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """Image files of `root/<class>/**` (extensions case-insensitive), their labels and the class names.

    With `classes` (the training classes), the folders of `root` must be among them.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{where}={root}: no such directory; point it at a folder with one sub-folder per class")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"{where}={root}: no class folders; put the images of each class in {root}/<class name>/")
    if classes is not None and set(found) - set(classes):
        raise UserError(
            f"{where}={root}: class folders {sorted(set(found) - set(classes))} are not training classes "
            f"({', '.join(classes)}); rename or remove them"
        )
    classes = classes if classes is not None else found
    paths: list[str] = []
    labels: list[int] = []
    for name in found:
        index = classes.index(name)
        files = sorted(
            str(f) for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise UserError(
                f"{where}={root}: class folder {name}/ holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        paths += files
        labels += [index] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), classes
