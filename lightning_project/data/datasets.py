"""Where images come from: the embedded digits, class folders on disk, CIFAR-10; and the Dataset types."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from lightning_project.data.images import IMAGE_EXTENSIONS, load_image
from lightning_project.errors import UserError

log = logging.getLogger(__name__)


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
        try:  # decoded here, in the loader's worker, once per sample
            image = load_image(self.paths[i])
        except Exception as e:  # the file was checked before training: it changed since, or checks were off
            raise UserError(
                f"cannot read image {self.paths[i]} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "fix or remove it (data.check_images=true finds every such file before training)"
            ) from None
        return (self.transform(image) if self.transform else image), self.labels[i]


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

    With `classes` (the training classes), the folders of `root` must be among them. Files without
    an image extension are ignored (and counted in the log).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{where}={root}: no such directory; point it at a folder with one sub-folder per class")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not _hidden(d.name))
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
    ignored: dict[str, int] = {}
    for name in found:
        index = classes.index(name)
        files = []
        for f in sorted((root / name).rglob("*")):
            if not f.is_file() or any(_hidden(part) for part in f.relative_to(root / name).parts):
                continue  # .DS_Store, .ipynb_checkpoints/, @eaDir/ thumbnails: not images of the class
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(str(f))
            else:
                ignored[f.suffix.lower() or "(none)"] = ignored.get(f.suffix.lower() or "(none)", 0) + 1
        if not files:
            raise UserError(
                f"{where}={root}: class folder {name}/ holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder"
            )
        paths += files
        labels += [index] * len(files)
    if ignored:
        log.info("%s=%s: ignored %d files without an image extension (%s)", where, root, sum(ignored.values()),
                 ", ".join(f"{k}: {v}" for k, v in sorted(ignored.items())))
    return paths, np.asarray(labels, dtype=np.int64), classes


def _hidden(name: str) -> bool:
    """Folders and files that tools leave behind (macOS, Jupyter, Synology), never class data."""
    return name.startswith(".") or name in ("__MACOSX", "@eaDir", "__pycache__")


PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "file_name", "image", "image_path",
                "image_id", "img", "id")
LABEL_COLUMNS = ("label", "class", "target", "category", "class_name", "y")


def _column(header: list[str], wanted: str | None, candidates: tuple[str, ...], key: str, csv_path) -> str:
    if wanted is not None:
        if wanted not in header:
            raise UserError(f"{key}={wanted}: {csv_path} has no such column (columns: {', '.join(header)})")
        return wanted
    lower = {h.lower(): h for h in header}
    for name in candidates:
        if name in lower:
            return lower[name]
    raise UserError(f"{key}: {csv_path} has none of the usual columns ({', '.join(candidates)}); "
                    f"name one of {', '.join(header)} with {key}=<column>")


def _class_order(names: set[str]) -> list[str]:
    """Sorted class names; numerically when every name is an integer ('2' before '10')."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def read_table(
    csv_path: str | Path,
    root: str | Path | None = None,
    path_column: str | None = None,
    label_column: str | None = None,
    fold_column: str | None = "fold",
    extension: str | None = None,
) -> tuple[list[str], np.ndarray, list[str], np.ndarray | None]:
    """(paths, labels, class names, folds or None) from a file/label table (the layout of most
    competitions). Paths are relative to `root` (default: the table's folder); `extension` is added
    to names that have none (tables of image ids). Columns named None are found by their usual names."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"data.csv={csv_path}: no such file; give the table of image paths and labels")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: tables saved by Excel
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header  # `image, label` as well as `image,label`
        rows = list(reader)
    if not rows:
        raise UserError(f"data.csv={csv_path}: no rows; it needs a header line and one row per image")
    path_key = _column(header, path_column, PATH_COLUMNS, "data.path_column", csv_path)
    label_key = _column(header, label_column, LABEL_COLUMNS, "data.label_column", csv_path)
    blank = [i + 2 for i, r in enumerate(rows) if not (r[path_key] or "").strip() or not (r[label_key] or "").strip()]
    if blank:
        raise UserError(f"data.csv={csv_path}: lines {blank[:10]} have an empty {path_key} or {label_key}; "
                        "fill or delete them")
    base = Path(root) if root else csv_path.parent
    suffix = None if extension is None else (str(extension) if str(extension).startswith(".") else f".{extension}")
    paths = []
    for r in rows:
        p = Path(r[path_key].strip())
        if suffix and p.suffix.lower() not in IMAGE_EXTENSIONS:  # ids, dotted ids (1.2.3) included
            p = p.with_name(p.name + suffix)
        paths.append(str(p if p.is_absolute() else base / p))
    names = [r[label_key].strip() for r in rows]
    first: dict[str, int] = {}
    keep = []
    for i, (path, name) in enumerate(zip(paths, names)):
        if path not in first:
            first[path] = i
            keep.append(i)
        elif names[first[path]] != name:
            raise UserError(f"data.csv={csv_path}: {path} has two labels ({names[first[path]]!r} on line "
                            f"{first[path] + 2}, {name!r} on line {i + 2}); keep one")
    if len(keep) < len(rows):  # a row twice would land in two splits (a test image seen in training)
        log.warning("data.csv=%s: %d duplicate rows dropped", csv_path, len(rows) - len(keep))
        rows, paths, names = [rows[i] for i in keep], [paths[i] for i in keep], [names[i] for i in keep]
    classes = _class_order(set(names))
    index = {c: i for i, c in enumerate(classes)}
    folds = None
    if fold_column and fold_column in header:
        try:
            folds = np.asarray([int(r[fold_column]) for r in rows], dtype=np.int64)
        except ValueError:
            raise UserError(f"data.fold_column={fold_column}: {csv_path} holds non-integer folds; "
                            "number them 0..k-1 or set data.fold_column=null") from None
    return paths, np.asarray([index[n] for n in names], dtype=np.int64), classes, folds
