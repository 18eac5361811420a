"""User mistakes through the real commands: exit status 2, one `error:` line naming key, value and fix."""

from __future__ import annotations

import re

import pytest
from conftest import compose_train, error_line, make_image_folder, run_command, train

from lightning_project.train import train as train_function
from lightning_project.utils.runtime import user_errors

pytestmark = pytest.mark.slow


def _layout(root, kind):
    if kind == "files_only":
        root.mkdir(parents=True)
        (root / "photo.jpg").write_bytes(b"\xff\xd8")
    elif kind == "empty_class":
        make_image_folder(root, ("cat", "dog"), per_class=4)
        (root / "bird").mkdir()
    return root


@pytest.mark.parametrize(
    "overrides, layout, expected",
    [
        (["model.name=resnet5"], None,
         r"model.name='resnet5' is not a torchvision classification model; close names: resnet50"),
        (["data=imagefolder", "data.root={root}"], "missing", r"data.root=.*missing: no such directory"),
        (["data=imagefolder", "data.root={root}"], "files_only", r"data.root=.*files_only: no class folders"),
        (["data=imagefolder", "data.root={root}"], "empty_class",
         r"class folder bird/ holds no images .* add images or remove the folder"),
        (["data=imagefolder"], None, r"data.root is not set: data=imagefolder needs data.root=DIR"),
        (["model=vgg16", "optim=sgd_groups", "model.parts.neck=[classifier.0.biase]"], None,
         r"optim.groups.neck.patterns: pattern 'classifier.0.biase' matches no parameter; closest names: classifier.0.bias"),
        (["model=vgg16", "optim=sgd_groups", "model.parts.neck=[classifier]"], None,
         r"optim.groups.head: parameter classifier.6.weight is also claimed by group 'neck'"),
    ],
    ids=["model-name", "root-missing", "no-class-folders", "empty-class", "root-unset", "misspelt-pattern",
         "overlapping-groups"],
)
def test_bad_input_is_one_clear_line(tmp_path, env, overrides, layout, expected):
    root = _layout(tmp_path / (layout or "unused"), layout)
    run = tmp_path / "run"
    proc = train(run, *[o.format(root=root) for o in overrides], env=env, check=False)
    assert re.search(expected, error_line(proc)), error_line(proc)
    assert not (run / "metrics.json").exists() and not (run / "checkpoints").exists()


def test_evaluate_with_a_foreign_checkpoint(tmp_path, env):
    """Missing, truncated and pickled checkpoints: tests/test_inference.py (in-process, every command's loader)."""
    foreign = tmp_path / "foreign.ckpt"
    import torch

    torch.save({"state_dict": {}}, foreign)
    proc = run_command("evaluate", f"ckpt_path={foreign}", f"hydra.run.dir={tmp_path / 'b'}",
                       env=env, cwd=tmp_path, check=False)
    assert "not a lightning_project checkpoint" in error_line(proc)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.pretrained=true", "model.download=false"],
         r"model.pretrained=true but ResNet18_Weights.IMAGENET1K_V1 could not be loaded .* place "
         r"https://download.pytorch.org/models/resnet18-f37072fd.pth at .*/hub/checkpoints/resnet18-f37072fd.pth"),
        (["augment.train.crop._target_=RandomResizedCrap"],
         r"augment.train.crop._target_: torchvision.transforms.v2 has no 'RandomResizedCrap'; close names: RandomResizedCrop"),
        (["+augment.train.crop.sise=3"], r"augment.train.crop: RandomResizedCrop\(size.* rejects"),
        (["scheduler.name=cosin"], r"scheduler.name='cosin': choose one of onecycle, cosine"),
        (["scheduler=multistep", "scheduler.milestones=[4,2]"], r"scheduler.milestones=\[4, 2\]: give increasing"),
        (["optim.lr=-0.1"], r"optim.lr=-0.1: the learning rate must be positive"),
        (["optim._target_=Adamm"], r"optim._target_: torch.optim has no 'Adamm'; close names: Adam"),
        (["optim=adam", "+optim.momentum=0.9"], r"optim: Adam rejects the options .*momentum"),
        (["optim.groups=[{name:head,patterns:[fc],weight_decy:0.1}]"], r"optim.groups.head: SGD has no option weight_decy"),
        (["finetune.strategy=everything"], r"finetune.strategy='everything': choose one of full, feature_extractor, partial"),
        (["finetune=partial", "finetune.train_stages=7"], r"finetune.train_stages=7: ResNet has 5 blocks"),
        (["data.val_fraction=0.9"], r"data.val_fraction \+ data.test_fraction = 1.05: leaves no training images"),
        (["data.batch_size=0"], r"data.batch_size=0: must be a positive integer"),
        (["data.num_classes=5"], r"data.num_classes=5 but the data holds 10 classes"),
        (["matmul_precision=fast"], r"matmul_precision='fast': choose highest, high \(TF32\) or medium"),
        (["trainer.precision=fp33"], r"trainer \(accelerator=auto, devices=1, precision=fp33\): .*fp33.*; fix trainer"),
        (["model.weights=IMAGENET9K"], r"model.weights='IMAGENET9K' is not a weight set of resnet18; choose one of IMAGENET1K_V1"),
        (["finetune=gradual", "finetune.milestones=[3,1]"], r"finetune.milestones=\[3, 1\]: give increasing epoch"),
        (["finetune=gradual", "trainer.max_epochs=6"], r"finetune.milestones=\[2, 4, 6\]: the last milestone \(epoch 6\)"),
        (["finetune.lr_decay=0"], r"finetune.lr_decay=0.0: give a factor in \(0, 1\]"),
        (["callbacks.collapse_detector.patience=0"],
         r"callbacks.collapse_detector \(lightning_project.callbacks.CollapseDetector\): patience=0: must be at least 1"),
    ],
    ids=["pretrained-offline", "transform-name", "transform-argument", "scheduler-name", "milestones",
         "negative-lr", "optimizer-name", "optimizer-option", "group-option", "strategy", "train-stages",
         "fractions", "batch-size", "num-classes", "matmul", "precision", "weight-set", "gradual-order",
         "gradual-too-long", "lr-decay", "callback-option"],
)
def test_bad_configuration_is_reported_before_training(tmp_path, capsys, overrides, expected):
    """The same entry function as the command (in-process: the import cost is paid once)."""
    cfg = compose_train(["trainer.enable_progress_bar=false", "logger=csv", *overrides], tmp_path)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        train_function(cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(expected, lines[0]), lines
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.json").exists()
