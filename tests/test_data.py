"""Data modules, splits and augmentation pipelines, on the embedded digits and tiny image folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_train, make_image_folder
from torchvision.transforms import v2

from lightning_project.data import DigitsDataModule, ImageFolderDataModule, create_datamodule
from lightning_project.data.splits import stratified_split
from lightning_project.data.transforms import build_pipeline
from lightning_project.errors import UserError
from lightning_project.utils.config import plain

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
EVAL = {"resize": {"_target_": "Resize", "size": 32}, "crop": {"_target_": "CenterCrop", "size": 32}}


def digits(**kwargs):
    return DigitsDataModule(batch_size=16, num_workers=0, eval_transforms=EVAL, train_transforms=EVAL,
                            mean=MEAN, std=STD, **kwargs)


def test_digits_split_is_stratified_and_follows_the_seed():
    a, b, c = digits(seed=1), digits(seed=1), digits(seed=2)
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.classes == [str(i) for i in range(10)]
    assert a.counts == {"train": 1257, "val": 270, "test": 270}
    val_labels = a._items["val"][1]
    assert set(np.bincount(val_labels, minlength=10)) <= {26, 27, 28}  # every class keeps its share
    assert torch.equal(a._items["val"][0], b._items["val"][0])
    assert not torch.equal(a._items["val"][0], c._items["val"][0])
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert -2.2 < x.min() and x.max() < 2.7  # normalised with the ImageNet statistics


def test_image_folder_flat_with_mixed_case_extensions(tmp_path):
    make_image_folder(tmp_path / "imgs", ("cat", "dog"), per_class=10)
    make_image_folder(tmp_path / "imgs", ("dog",), per_class=2, ext=".PNG", seed=3)
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(root=str(tmp_path / "imgs"), eval_transforms=EVAL, train_transforms=EVAL,
                               val_fraction=0.2, test_fraction=0.2, batch_size=4, num_workers=0)
    assert dm.prepare() == ["cat", "dog"]
    assert sum(dm.counts.values()) == 22 and dm.counts["val"] >= 4 and dm.counts["test"] >= 4
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32)


def test_image_folder_split_folders_on_disk(tmp_path):
    make_image_folder(tmp_path / "train", ("a", "b"), per_class=10)
    make_image_folder(tmp_path / "val", ("a", "b"), per_class=3)
    dm = ImageFolderDataModule(root=str(tmp_path), eval_transforms=EVAL, test_fraction=0.2, num_workers=0)
    dm.prepare()
    assert dm.counts == {"train": 16, "val": 6, "test": 4}  # no test/: carved from train only


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "data.root=.*missing: no such directory"),
        ("files_only", "no class folders; put the images of each class in"),
        ("empty_class", "class folder empty/ holds no images"),
        ("unknown_val_class", r"class folders \['zebra'\] are not training classes"),
    ],
)
def test_image_folder_errors(tmp_path, layout, message):
    root = tmp_path / layout
    if layout == "files_only":
        root.mkdir()
        (root / "x.png").write_bytes(b"")
    elif layout == "empty_class":
        make_image_folder(root, ("full",), per_class=4)
        (root / "empty").mkdir()
    elif layout == "unknown_val_class":
        make_image_folder(root / "train", ("a", "b"), per_class=6)
        make_image_folder(root / "val", ("zebra",), per_class=2)
    dm = ImageFolderDataModule(root=str(root), eval_transforms=EVAL, num_workers=0)
    with pytest.raises(UserError, match=message):
        dm.prepare()


def test_root_is_required_and_class_count_is_checked(tmp_path):
    with pytest.raises(UserError, match="data.root is not set"):
        ImageFolderDataModule(root=None)
    make_image_folder(tmp_path, ("a", "b", "c"), per_class=6)
    with pytest.raises(UserError, match=r"data.num_classes=5 but the data holds 3 classes \(a, b, c\)"):
        ImageFolderDataModule(root=str(tmp_path), num_classes=5, num_workers=0).prepare()


def test_create_datamodule_checks_target_and_keys():
    with pytest.raises(UserError, match="not an ImageDataModule"):
        create_datamodule("torch.nn.Linear")
    with pytest.raises(UserError, match="unexpected keyword argument 'bach_size'"):
        create_datamodule("lightning_project.data.DigitsDataModule", bach_size=3)


@pytest.mark.parametrize(
    "values, message",
    [((0.5, 0.5), "leaves no training images"), ((1.2, 0.0), r"data.val_fraction=1.2: must be in \[0, 1\)")],
)
def test_split_fractions_are_checked(values, message):
    with pytest.raises(UserError, match=message):
        stratified_split(np.zeros(10, dtype=int), *values, seed=0)


def test_pipeline_steps_in_order_with_nulls_skipped_and_nested_specs():
    spec = {
        "crop": {"_target_": "RandomResizedCrop", "size": 24, "scale": [0.5, 1.0]},
        "flip": None,
        "maybe_blur": {"_target_": "RandomApply", "p": 0.5,
                       "transforms": [{"_target_": "torchvision.transforms.v2.GaussianBlur", "kernel_size": 3}]},
    }
    pipeline = build_pipeline(spec, MEAN, STD, "augment.train")
    kinds = [type(t) for t in pipeline.transforms]
    assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomApply, v2.ToDtype, v2.Normalize]
    out = pipeline(torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"blur": {"_target_": "GausianBlur", "kernel_size": 3}},
         r"augment.train.blur._target_: torchvision.transforms.v2 has no 'GausianBlur'; close names: GaussianBlur"),
        ({"crop": {"_target_": "RandomResizedCrop", "sise": 3}},
         r"augment.train.crop: RandomResizedCrop\(size.*rejects \{'sise': 3\}"),
        ({"jitter": {"brightness": 0.2}}, r"augment.train.jitter: expected \{_target_: TransformName"),
        ("RandomCrop", "must be a mapping of steps or a list"),
    ],
)
def test_pipeline_errors_name_the_step(spec, message):
    with pytest.raises(UserError, match=message):
        build_pipeline(spec, MEAN, STD, "augment.train")


def test_cifar10_offline_names_the_file_to_place(tmp_path):
    from lightning_project.data import CIFAR10DataModule

    dm = CIFAR10DataModule(root=str(tmp_path), download=False, eval_transforms=EVAL, num_workers=0)
    with pytest.raises(UserError, match=r"data=cifar10: CIFAR-10 is not under .* place cifar-10-python.tar.gz"):
        dm.prepare()


def test_the_presets_exist_and_random_erasing_acts_on_the_normalised_tensor(tmp_path):
    """(Every preset is composed, built and run at its image size in test_config.py.)"""
    presets = {p.stem for p in (ROOT / "conf" / "augment").glob("*.yaml")}
    assert {"basic", "strong", "randaugment", "trivialaugment", "autoaugment", "random_erasing",
            "rotate_blur_jitter", "crop_flip_jitter", "none"} <= presets
    erasing = build_pipeline(plain(compose_train(["augment=random_erasing"], tmp_path).augment.train), MEAN, STD)
    assert [type(t).__name__ for t in erasing.transforms][-3:] == ["ToDtype", "Normalize", "RandomErasing"]
    torch.manual_seed(0)
    image = torch.full((3, 64, 64), 200, dtype=torch.uint8)
    outs = [erasing(image) for _ in range(40)]
    erased = [o for o in outs if (o == 0).all(dim=0).any()]
    assert erased and len(erased) < 40  # some images carry a patch of exact zeros: the mean colour


def test_a_preset_from_the_users_own_yaml_file_and_the_cifar_policy(tmp_path):
    (tmp_path / "augment").mkdir()
    (tmp_path / "augment" / "mine.yaml").write_text(
        "defaults: [basic, _self_]\ntrain:\n  jitter: {_target_: ColorJitter, brightness: 0.4}\n")
    cfg = compose_train([f"hydra.searchpath=[file://{tmp_path}]", "augment=mine"], tmp_path)
    assert list(cfg.augment.train) == ["crop", "flip", "jitter"]
    cfg = compose_train(["augment=autoaugment", "augment.train.policy.policy.value=cifar10"], tmp_path)
    pipeline = build_pipeline(plain(cfg.augment.train), MEAN, STD)
    assert pipeline.transforms[3].policy.value == "cifar10"


def test_a_step_that_fails_on_an_image_is_reported_before_training():
    dm = DigitsDataModule(train_transforms={"crop": {"_target_": "RandomCrop", "size": 64}}, eval_transforms=EVAL,
                          num_workers=0)  # a crop larger than the 8 px digits
    dm.prepare()
    with pytest.raises(UserError, match=r"augment.train: the pipeline fails on a training image \(ValueError: "):
        dm.check_transforms()


def test_pipelines_must_give_the_network_input_size():
    dm = DigitsDataModule(train_transforms={}, eval_transforms=EVAL, image_size=32, num_workers=0)
    dm.prepare()
    with pytest.raises(UserError, match=r"augment.train yields 8x8 images, augment.image_size is 32: end augment.train "
                                        r"with a crop to 32"):
        dm.check_transforms()


def test_balanced_sampler_feeds_the_training_loader():
    from torch.utils.data import WeightedRandomSampler

    dm = digits(sampler="balanced")
    dm.setup("fit")
    assert isinstance(dm.train_dataloader().sampler, WeightedRandomSampler)
    assert not isinstance(dm.val_dataloader().sampler, WeightedRandomSampler)


def test_show_batch_writes_the_grid_with_mixed_labels(tmp_path):
    from lightning_project.show_batch import show_batch

    cfg = compose_train(["augment.mixup_alpha=0.4", "show_batch.num_images=6", "show_batch.columns=3"],
                        tmp_path, name="show_batch")
    path, titles = show_batch(cfg)
    assert path == tmp_path / "batch.png" and path.stat().st_size > 3000
    assert len(titles) == 6 and any(" / " in t for t in titles)  # mixed samples name both classes
    for title in titles:
        weights = [float(part.rsplit(" ", 1)[1]) for part in title.split(" / ")] if " / " in title else [1.0]
        assert abs(sum(weights) - 1) < 0.02
    again = show_batch(compose_train(["augment.mixup_alpha=0.4", "show_batch.num_images=6"], tmp_path / "b",
                                     name="show_batch"))[1]
    assert again == titles  # the seed fixes what is shown
