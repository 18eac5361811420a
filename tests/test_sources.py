"""Real folders and tables of image files: the pre-training check, bad files, CSV tables, k-fold splits."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from lightning_project.data import CSVDataModule, DigitsDataModule, ImageFolderDataModule
from lightning_project.errors import UserError
from lightning_project.utils import runtime

EVAL = {"resize": {"_target_": "Resize", "size": 32}, "crop": {"_target_": "CenterCrop", "size": 32}}
BAD = {"cat/corrupt.jpg", "cat/truncated.jpg", "dog/zero.png", "fox/text.jpg"}


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A user's folder: JPEG and PNG files, a grayscale and an RGBA image, a corrupt, a truncated and a
    zero-byte file, a text file named .jpg, a notes file, an upper-case extension, a hidden file."""
    root = make_image_folder(tmp_path_factory.mktemp("messy") / "photos", per_class=6, ext=".jpg")
    make_image_folder(root, ("dog",), per_class=2, ext=".PNG", seed=4)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), "L").save(root / "fox" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), "RGBA").save(root / "dog" / "alpha.png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(buffer.getvalue()[:900])
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 255, 500, dtype=np.uint8)))
    (root / "dog" / "zero.png").write_bytes(b"")
    (root / "fox" / "text.jpg").write_text("an HTML error page saved as .jpg")
    (root / "fox" / "notes.txt").write_text("not an image: ignored")
    (root / "fox" / ".DS_Store").write_bytes(b"\0\0")
    return root


def folder(root, **kwargs):
    kwargs = {"eval_transforms": EVAL, "train_transforms": EVAL, "num_workers": 0, "batch_size": 4, **kwargs}
    return ImageFolderDataModule(root=str(root), **kwargs)


def test_bad_files_stop_before_training_with_one_line_listing_them(messy):
    with pytest.raises(UserError) as e:
        folder(messy).prepare()
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"data.root={messy}: 4 of 26 files are not readable images")
    for name in BAD:
        assert name in message
    assert message.endswith("fix or delete them, or set data.on_bad_file=skip")


def test_skip_trains_on_the_rest_and_every_mode_loads(messy):
    dm = folder(messy, on_bad_file="skip", val_fraction=0.2, test_fraction=0.2)
    assert dm.prepare() == ["cat", "dog", "fox"]
    assert sum(dm.counts.values()) == 22  # 26 image-named files - 4 unreadable (the .txt and hidden file ignored)
    assert {str(p.relative_to(messy)) for p in map(type(messy), dm.bad_files)} == BAD
    assert sum(dm.class_counts["train"].values()) == dm.counts["train"]
    dm.setup("fit")
    for split in ("train", "val", "test"):
        for x, y in dm.eval_dataloader(split):
            assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
    info = dm.class_info()
    assert info["class_to_idx"] == {"cat": 0, "dog": 1, "fox": 2}
    assert {c: sum(info["counts"][s][c] for s in ("train", "val", "test")) for c in info["classes"]} == {
        "cat": 6, "dog": 9, "fox": 7}


def test_a_file_broken_after_the_check_is_one_line_from_a_worker(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs", ("a", "b"), per_class=6)
    dm = folder(root, check_images=False, val_fraction=0.3, test_fraction=0.0, num_workers=1)
    dm.setup("fit")
    broken = dm._items["train"][0][0]
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    with open(broken, "wb") as f:  # truncated after the check: opens, fails while decoding
        f.write(buffer.getvalue()[:2000])
    with pytest.raises(SystemExit) as e, runtime.user_errors():
        list(dm.eval_dataloader("train"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"error: cannot read image {broken} (")


def test_check_images_false_still_finds_missing_table_rows(tmp_path):
    make_image_folder(tmp_path / "imgs", ("a", "b"), per_class=4)
    (tmp_path / "t.csv").write_text("image,label\nimgs/a/img0.png,a\nimgs/a/gone.png,a\n")
    with pytest.raises(UserError, match=r"1 of 2 files are not readable images: .*gone.png \(no such file\)"):
        CSVDataModule(csv=str(tmp_path / "t.csv"), check_images=False, eval_transforms=EVAL).prepare()


def test_csv_duplicates_are_dropped_and_conflicting_labels_refused(tmp_path, caplog):
    make_image_folder(tmp_path / "imgs", ("a", "b"), per_class=6)
    rows = [f"imgs/{c}/img{j}.png,{c}" for c in "ab" for j in range(6)]
    (tmp_path / "t.csv").write_text("image , label\n" + "\n".join(rows + rows[:3]) + "\n")  # spaced header
    dm = CSVDataModule(csv=str(tmp_path / "t.csv"), eval_transforms=EVAL, num_workers=0, val_fraction=0.3,
                       test_fraction=0.0)
    dm.prepare()
    assert dm.counts["train"] + dm.counts["val"] == 12 and "3 duplicate rows dropped" in caplog.text
    train, val = set(dm._items["train"][0]), set(dm._items["val"][0])
    assert not train & val
    (tmp_path / "t.csv").write_text("image,label\n" + "\n".join(rows + ["imgs/a/img0.png,b"]) + "\n")
    with pytest.raises(UserError, match=r"img0.png has two labels \('a' on line 2, 'b' on line 14\); keep one"):
        CSVDataModule(csv=str(tmp_path / "t.csv"), eval_transforms=EVAL, num_workers=0).prepare()


def test_tiny_classes_are_named(tmp_path, caplog):
    make_image_folder(tmp_path / "imgs", ("big",), per_class=12)
    make_image_folder(tmp_path / "imgs", ("one",), per_class=1)
    with pytest.raises(UserError, match=r"classes one \(1\) have fewer than 2 images: a stratified split needs"):
        folder(tmp_path / "imgs").prepare()
    make_image_folder(tmp_path / "imgs", ("one",), per_class=2)
    folder(tmp_path / "imgs").prepare()
    assert "classes ['one'] have no test images; their test metrics are missing" in caplog.text


def test_csv_table_ids_numeric_labels_and_fold_column(tmp_path):
    make_image_folder(tmp_path / "train", ("0", "2", "10"), per_class=8)
    rows = ["id,target,fold"]
    for index, name in enumerate(("0", "2", "10")):
        rows += [f"{name}/img{j},{name},{j % 4}" for j in range(8)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    kwargs = dict(csv=str(tmp_path / "labels.csv"), root=str(tmp_path / "train"), extension="png",
                  eval_transforms=EVAL, num_workers=0, test_fraction=0.0)
    dm = CSVDataModule(**kwargs, fold=2)
    assert dm.prepare() == ["0", "2", "10"]  # integer labels in numeric order
    val_paths = dm._items["val"][0]
    assert len(val_paths) == 6 and all(int(p.rsplit("img", 1)[1][:-4]) % 4 == 2 for p in val_paths)
    assert dm.counts == {"train": 18, "val": 6, "test": 6}  # no test share: tested on val (warned)
    with pytest.raises(UserError, match=r"data.fold=4: choose a fold in 0..3"):
        CSVDataModule(**kwargs, fold=4).prepare()
    grouped = CSVDataModule(**{**kwargs, "test_fraction": 0.15}, fold=2)  # the folds (groups) decide, not chance
    grouped.prepare()
    assert grouped.counts == {"train": 18, "val": 6, "test": 6}


@pytest.mark.parametrize(
    "table, kwargs, message",
    [
        ("file,kind\nx.png,a\n", {}, r"data.label_column: .* has none of the usual columns .*name one of file, kind"),
        ("image,label\nx.png,a\n", {"path_column": "path"}, r"data.path_column=path: .* no such column"),
        ("image,label\nx.png,\n", {}, r"lines \[2\] have an empty image or label"),
        ("image,label\n", {}, "no rows"),
        ("image,label,fold\nx.png,a,one\n", {}, "data.fold_column=fold: .* non-integer folds"),
    ],
)
def test_csv_mistakes_name_the_column_or_line(tmp_path, table, kwargs, message):
    (tmp_path / "t.csv").write_text(table)
    with pytest.raises(UserError, match=message):
        CSVDataModule(csv=str(tmp_path / "t.csv"), eval_transforms=EVAL, **kwargs).prepare()


def _ids(dm, split) -> set:
    """The digits of a split as hashable identities (their pixel bytes)."""
    return {x.numpy().tobytes() for x in dm._items[split][0]}


def test_kfold_folds_partition_the_rest_and_share_one_test_split():
    folds = []
    for fold in range(3):
        dm = DigitsDataModule(fold=fold, num_folds=3, test_fraction=0.2, eval_transforms=EVAL, num_workers=0)
        dm.prepare()
        folds.append({s: _ids(dm, s) for s in ("train", "val", "test")} | {"labels": dm._items["val"][1]})
    assert folds[0]["test"] == folds[1]["test"] == folds[2]["test"]
    vals = [f["val"] for f in folds]
    assert not (vals[0] & vals[1]) and not (vals[1] & vals[2]) and not (vals[0] & vals[2])
    assert vals[0] | vals[1] | vals[2] == folds[0]["train"] | vals[0]  # the folds cover the non-test part
    assert not (folds[0]["train"] & folds[0]["test"])
    counts = np.bincount(folds[0]["labels"], minlength=10)
    assert counts.min() >= 9 and counts.max() - counts.min() <= 3  # stratified: every class in every fold


def test_kfold_with_a_val_folder_on_disk_is_refused(tmp_path):
    make_image_folder(tmp_path / "train", ("a", "b"), per_class=6)
    make_image_folder(tmp_path / "val", ("a", "b"), per_class=2)
    with pytest.raises(UserError, match=r"data.fold=1: the data has its own validation split \(a val/ folder\)"):
        folder(tmp_path, fold=1).prepare()


def test_bad_file_error_through_the_command(messy, tmp_path, env):
    """The real command: exit 2 and one line, before a model is built."""
    from conftest import error_line, run_command

    proc = run_command("train", "data=imagefolder", f"data.root={messy}", "data.image_size=32",
                       f"hydra.run.dir={tmp_path / 'run'}", "model.pretrained=false", env=env, cwd=tmp_path,
                       check=False)
    assert isinstance(proc, subprocess.CompletedProcess)
    line = error_line(proc)
    assert "4 of 26 files are not readable images" in line and "data.on_bad_file=skip" in line
    assert not (tmp_path / "run" / "checkpoints").exists()
