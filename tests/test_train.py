"""End-to-end: the real `train` and `evaluate` commands on tiny data, and what they leave behind."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import error_line, make_image_folder, metrics, run_command, train

from lightning_project.models.backbones import build_network

pytestmark = pytest.mark.slow

SMALL = ["trainer.max_epochs=2", "trainer.limit_train_batches=4", "data.batch_size=32", "trainer.log_every_n_steps=2"]


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, env) -> Path:
    """ResNet-18 on digits, two short epochs, full validation and test splits, both default loggers."""
    run = tmp_path_factory.mktemp("digits") / "run"
    train(run, "trainer.enable_progress_bar=false", "model.pretrained=false", *SMALL, env=env, fast=False)
    return run


def test_run_directory_holds_the_contract(digits_run):
    config = (digits_run / ".hydra" / "config.yaml").read_text()
    assert "${" not in config and "name: resnet18" in config and f"run_dir: {digits_run}" in config
    report = metrics(digits_run)
    best = Path(report["best_checkpoint"])
    assert best.parent == digits_run / "checkpoints" and best.name.startswith("best-epoch") and best.is_file()
    assert Path(report["last_checkpoint"]) == digits_run / "checkpoints" / "last.ckpt"
    assert (digits_run / "checkpoints" / "last.ckpt").is_file()
    assert report["pretrained"] == {"requested": "False", "used": False, "source": "random"}
    assert report["optimized_metric"]["name"] == "val/acc"
    assert report["optimized_metric"]["value"] == pytest.approx(report["best_score"])
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1", "test/acc", "test/f1",
                "test/precision", "test/recall", "test/top5"):
        assert 0.0 <= report["metrics"][key] < 100, key
    assert report["epochs"] == 2 and report["global_step"] == 8 and len(report["history"]) == 2
    assert report["timings"]["fit_seconds"] > 0
    assert report["split_sizes"] == {"train": 1257, "val": 270, "test": 270}
    for png in ("curves.png", "confusion_matrix.png"):
        assert (digits_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = csv_rows(digits_run)
    assert any(row.get("lr/default") for row in rows)  # every group's lr is logged under its name
    assert any(row.get("val/acc") for row in rows) and any(row.get("train/loss") for row in rows)
    assert list((digits_run / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_carries_what_inference_needs(digits_run):
    ckpt = torch.load(metrics(digits_run)["best_checkpoint"], map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["class_names"] == [str(i) for i in range(10)] and hp["image_size"] == 32
    assert hp["mean"] == [0.485, 0.456, 0.406] and hp["std"] == [0.229, 0.224, 0.225]
    assert ckpt["lightning_project"]["pretrained_used"] is False
    assert ckpt["datamodule_hyper_parameters"]["eval_transforms"]["crop"]["_target_"] == "CenterCrop"


def test_evaluate_reproduces_the_test_metrics(digits_run, env, tmp_path):
    best = metrics(digits_run)["best_checkpoint"]
    out = tmp_path / "eval.json"
    run_command("evaluate", f"ckpt_path={best}", f"output={out}", f"hydra.run.dir={tmp_path / 'run'}",
                "trainer.enable_progress_bar=false", env=env, cwd=tmp_path)
    evaluated = json.loads(out.read_text())["metrics"]
    trained = metrics(digits_run)["metrics"]
    for key in ("test/acc", "test/f1", "test/loss"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key
    assert (tmp_path / "run" / "confusion_matrix.png").is_file()


def test_reload_in_a_fresh_process_without_hydra(digits_run, env, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys, torch
        from lightning_project.models import ClassifierModule
        from lightning_project.data import create_datamodule
        best = {metrics(digits_run)["best_checkpoint"]!r}
        model = ClassifierModule.load_from_checkpoint(best, map_location="cpu").eval()
        raw = torch.load(best, map_location="cpu", weights_only=True)
        data = create_datamodule(raw["lightning_project"]["datamodule_target"], **raw["datamodule_hyper_parameters"])
        data.setup("test")
        right = total = 0
        with torch.no_grad():
            for x, y in data.test_dataloader():
                right += (model(x).argmax(1) == y).sum().item()
                total += len(y)
        print(json.dumps({{"acc": right / total, "hydra": "hydra" in sys.modules,
                          "classes": model.hparams.class_names, "pretrained": model.weights_source.used}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["acc"] == pytest.approx(metrics(digits_run)["metrics"]["test/acc"], abs=1e-6)
    assert result["hydra"] is False and result["classes"][0] == "0" and result["pretrained"] is False


def test_resume_from_last_checkpoint(env, tmp_path):
    """An epoch-based schedule continues where it stopped; epochs, steps, history and lr carry on."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    recipe = ["scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5", "optim.lr=0.02",
              "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "data.batch_size=32",
              "trainer.log_every_n_steps=1"]
    train(first, *recipe, "trainer.max_epochs=1", env=env)
    train(resumed, *recipe, "trainer.max_epochs=3", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", env=env)
    report = metrics(resumed)
    assert report["epochs"] == 3 and report["global_step"] == 12  # one epoch restored, two more trained
    assert [row["epoch"] for row in report["history"]] == [0, 1, 2]  # the history came back with the checkpoint
    assert report["history"][0] == metrics(first)["history"][0]
    lrs = [float(row["lr/default"]) for row in csv_rows(resumed) if row.get("lr/default")]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.005)  # decayed after epochs 1 and 2


@pytest.mark.parametrize(
    "change, message",
    [
        ("trainer.max_epochs=3", "the checkpoint's onecycle schedule spans 8 steps, this run 12"),
        ("optim.lr=0.1", "trained with optim.lr=0.02, this run has 0.1"),
        ("model.name=resnet34", "trained with model_name='resnet18', this run has 'resnet34'"),
    ],
)
def test_resume_with_another_recipe_is_refused(digits_run, env, tmp_path, change, message):
    last = digits_run / "checkpoints" / "last.ckpt"
    proc = train(tmp_path / "run", f"ckpt_path={last}", *SMALL, change, env=env, check=False)
    assert message in error_line(proc)


@pytest.fixture(scope="module")
def vgg_run(tmp_path_factory, env) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """`model=vgg16 optim=sgd_groups` on 32 px images, starting from known weights, first block frozen."""
    base = tmp_path_factory.mktemp("vgg")
    make_image_folder(base / "images", ("ant", "bee", "cow"), per_class=8, size=32)
    weights = base / "vgg16_start.pt"
    net, _ = build_network("vgg16", 1000)
    torch.save(net.state_dict(), weights)
    del net
    run = base / "run"
    proc = train(run, "model=vgg16", "optim=sgd_groups", "data=imagefolder", f"data.root={base / 'images'}",
          "data.image_size=32", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
          "trainer.limit_train_batches=3", f"model.weights_path={weights}", "finetune.freeze=[features.0,features.2]",
          "trainer.log_every_n_steps=1", env=env)
    return run, weights, proc


def test_vgg16_sgd_groups_optimizer_holds_exactly_the_three_groups(vgg_run):
    run, _, _ = vgg_run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [(g["name"], g["max_lr"]) for g in groups] == [("body", 1e-4), ("neck", 5e-4), ("head", 1e-3)]
    assert [len(g["params"]) for g in groups] == [26, 4, 2]  # VGG-16: 13 convs, 2 hidden linears, the head
    logged = {k for row in csv_rows(run) for k, v in row.items() if v}
    assert {"lr/body", "lr/neck", "lr/head"} <= logged


def test_vgg16_frozen_parameters_are_bit_identical_and_the_rest_trained(vgg_run):
    run, weights, _ = vgg_run
    start = torch.load(weights, weights_only=True)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for name in ("features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"):
        assert torch.equal(state[f"net.{name}"], start[name]), name
    for name in ("features.5.weight", "features.28.weight", "classifier.0.weight", "classifier.3.weight"):
        assert not torch.equal(state[f"net.{name}"], start[name]), name
    report = metrics(run)
    assert report["pretrained"]["used"] is True and report["pretrained"]["source"].endswith("vgg16_start.pt")
    assert report["classes"] == ["ant", "bee", "cow"]


def test_vgg16_group_table_is_printed(vgg_run):
    out = vgg_run[2].stdout
    table = out[out.index("parameter groups (VGG, head: classifier.6)"):]
    for row in (r"body .*features .*22/26 .*14,675,968 .*38,720 .*0.0001",
                r"neck .*classifier.0, classifier.3 .*4/4 .*119,545,856 .*0 .*0.0005",
                r"head .*classifier.6 .*2/2 .*12,291 .*0 .*0.001"):
        assert re.search(row, table), row
    assert "frozen parameters: 38,720" in table  # features.0 (1,792) + features.2 (36,928)


def test_frozen_batchnorm_statistics_do_not_drift_with_cached_imagenet_weights(env, tmp_path, torch_home):
    """`finetune=partial` on ResNet-18 with weights read from torchvision's cache (model.pretrained=true)."""
    from lightning_project.models.backbones import cached_weights_file, weights_enum

    file = cached_weights_file(weights_enum("resnet18"))
    reference, _ = build_network("resnet18", 1000)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), file)
    try:
        run = tmp_path / "run"
        train(run, "finetune=partial", "model.pretrained=true", "model.download=false", "trainer.max_epochs=1",
              "trainer.limit_train_batches=3", "data.batch_size=16", "logger=csv", "trainer.enable_progress_bar=false",
              env=env, fast=False)
    finally:
        file.unlink()
    report = metrics(run)
    assert report["pretrained"] == {"requested": "True", "used": True, "source": "ResNet18_Weights.IMAGENET1K_V1"}
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    start = reference.state_dict()
    for name in ("bn1.running_mean", "bn1.running_var", "layer1.0.bn1.running_mean", "layer3.1.bn2.running_var",
                 "layer3.1.bn2.num_batches_tracked", "conv1.weight", "layer2.0.conv1.weight"):
        assert torch.equal(state[f"net.{name}"], start[name]), name
    for name in ("layer4.0.bn1.running_mean", "layer4.1.conv2.weight"):
        assert not torch.equal(state[f"net.{name}"], start[name]), name
