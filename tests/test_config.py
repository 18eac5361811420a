"""Every option of every config group composes, resolves, and builds what it describes."""

from __future__ import annotations

import pytest
import torch
from conftest import CONF, compose_train
from omegaconf import OmegaConf

from lightning_project.data.transforms import build_pipeline
from lightning_project.models import ClassifierModule
from lightning_project.optim import SCHEDULERS

GROUPS = ["data", "model", "finetune", "optim", "scheduler", "augment", "trainer", "logger", "callbacks",
          "debug", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))  # _x: shared parts


def test_every_documented_group_exists():
    for group in GROUPS + ["paths", "hydra"]:
        assert options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_each_option_composes_and_resolves(group, option, tmp_path):
    extra = ["data.root=/some/images"] if (group, option) in {("data", "imagefolder"), ("experiment", "vgg16_transfer")} else []
    extra += ["data.csv=/some/labels.csv"] if (group, option) == ("data", "csv") else []
    cfg = compose_train([f"{group}={option}", *extra], tmp_path)
    assert cfg.paths.run_dir == str(tmp_path)
    assert "${" not in OmegaConf.to_yaml(cfg)
    assert cfg.scheduler.name in SCHEDULERS
    image = torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8)
    for split in ("train", "eval"):  # the augmentation specs build, and give network-sized float tensors
        pipeline = build_pipeline(OmegaConf.to_container(cfg.augment[split]), [0.5] * 3, [0.5] * 3, f"augment.{split}")
        out = pipeline(image)
        assert out.shape == (3, cfg.augment.image_size, cfg.augment.image_size) and out.dtype == torch.float32


def test_every_config_file_says_what_it_is_for():
    missing = []
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        if not lines or not lines[0].startswith("#"):
            missing.append(f"{path.relative_to(CONF)}: no header comment")
    assert not missing, missing


@pytest.mark.parametrize("model", ["vgg16", "vgg16_bn", "resnet18", "resnet50", "torchvision"])
def test_sgd_groups_recipe_fits_each_model(model, tmp_path):
    cfg = compose_train([f"model={model}", "optim=sgd_groups"], tmp_path)
    assert [g["name"] for g in cfg.optim.groups] == ["body", "neck", "head"]
    module = ClassifierModule(cfg.model.name, num_classes=3, optim=OmegaConf.to_container(cfg.optim))
    table = {row["group"]: row for row in module.group_table()}
    assert list(table) == ["body", "neck", "head"]
    assert [table[g]["lr"] for g in table] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert module.frozen_parameter_count() == 0  # the three parts cover the whole network


def test_vgg16_recipe_names_the_layers(tmp_path):
    cfg = compose_train(["model=vgg16", "optim=sgd_groups"], tmp_path)
    assert [list(g["patterns"]) for g in cfg.optim.groups] == [
        ["features"], ["classifier.0", "classifier.3"], ["classifier.6"],
    ]
    assert cfg.optim.momentum == 0.9 and cfg.optim.rest == "freeze"


def test_default_augmentation_follows_the_data_set(tmp_path):
    assert "flip" not in compose_train([], tmp_path).augment.train  # digits: mirrored digits are not digits
    photos = compose_train(["data=imagefolder", "data.root=/x"], tmp_path)
    assert "flip" in photos.augment.train and photos.augment.image_size == 224
    assert "rotate" in compose_train(["data=imagefolder", "augment=strong"], tmp_path).augment.train


def test_evaluate_config_takes_data_from_the_checkpoint_unless_given(tmp_path):
    cfg = compose_train(["ckpt_path=x.ckpt"], tmp_path, name="evaluate")
    assert cfg.get("data") is None
    cfg = compose_train(["ckpt_path=x.ckpt", "data=imagefolder", "data.root=/x"], tmp_path, name="evaluate")
    assert cfg.data.root == "/x"


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "serve"])
def test_after_training_commands_share_the_checkpoint_keys(command, tmp_path):
    overrides = ["ckpt_paths=[a.ckpt,b.ckpt]", "tta=flip", "top_k=2"] + (["input=x"] if command == "predict" else [])
    cfg = compose_train(overrides, tmp_path, name=command)
    assert list(cfg.ckpt_paths) == ["a.ckpt", "b.ckpt"] and cfg.tta == "flip" and cfg.top_k == 2
    assert cfg.ckpt_path is None and cfg.sweep_dir is None
    assert cfg.device == ("cpu" if command == "export" else "auto")  # export verifies on the CPU
