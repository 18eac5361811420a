"""The README's promises: the default command, the debug modes, determinism."""

from __future__ import annotations

import json

import pytest
from conftest import compose_train, metrics, train

from lightning_project.train import train as train_function

pytestmark = pytest.mark.slow

QUIET = ["trainer.enable_progress_bar=false", "logger=csv", "model.pretrained=false"]


def test_default_command_reaches_the_documented_accuracy(tmp_path, env):
    """`make train` = `python -m lightning_project.train`: digits, ResNet-18, offline, >= 0.97 test accuracy."""
    run = tmp_path / "run"
    train(run, "trainer.enable_progress_bar=false", env=env, fast=False)
    report = metrics(run)
    assert report["metrics"]["test/acc"] >= 0.97, report["metrics"]
    assert report["pretrained"]["requested"] == "auto"
    assert report["epochs"] == 8


def test_fast_dev_run_tests_the_current_weights(tmp_path):
    cfg = compose_train(["debug=fdr", *QUIET], tmp_path)
    train_function(cfg)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["best_checkpoint"] is None and report["global_step"] == 1
    assert "test/acc" in report["metrics"]


def test_limit_debug_mode_runs_two_short_epochs_with_checkpoints(tmp_path):
    train_function(compose_train(["debug=limit", *QUIET], tmp_path))
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["epochs"] == 2 and report["global_step"] == 10
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_overfit_one_batch_drives_the_loss_to_zero(tmp_path):
    train_function(compose_train(["debug=overfit", "trainer.max_epochs=15", *QUIET], tmp_path))
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert history[0]["train/loss"] > 1.0 and history[-1]["train/loss"] < 0.05
    assert history[-1]["train/acc"] == 1.0


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_swaps_the_pooling_that_has_no_deterministic_cuda_kernel(tmp_path, deterministic):
    from torch import nn

    from lightning_project.models.backbones import normalization
    from lightning_project.models.layers import DeterministicAdaptiveAvgPool2d
    from lightning_project.train import build_datamodule, build_module

    cfg = compose_train(["model=vgg16", f"trainer.deterministic={str(deterministic).lower()}", *QUIET], tmp_path)
    mean, std = normalization(cfg.model.name)
    module = build_module(cfg, build_datamodule(cfg, mean, std), mean, std)
    kinds = {type(m) for m in module.net.modules()}
    assert (DeterministicAdaptiveAvgPool2d in kinds) is deterministic
    assert (nn.AdaptiveAvgPool2d in kinds) is not deterministic


@pytest.mark.parametrize(
    "overrides, frozen",
    [
        (["model=torchvision", "model.name=mobilenet_v3_small", "optim=sgd_groups"], False),
        (["finetune=feature_extractor", "optim=adam", "scheduler=cosine", "scheduler.warmup_epochs=0.5",
          "model.head_dropout=0.2"], True),
    ],
    ids=["any-torchvision-model", "feature-extractor-adam"],
)
def test_other_models_and_strategies_train(tmp_path, overrides, frozen):
    cfg = compose_train([*overrides, *QUIET, "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "data.batch_size=16"], tmp_path)
    train_function(cfg)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["global_step"] == 3 and "test/acc" in report["metrics"]
    assert (report["frozen_parameters"] > 0) is frozen
    if not frozen:  # the @body/@neck/@head aliases found mobilenet's parts
        assert [g["group"] for g in report["param_groups"]] == ["body", "neck", "head"]
        assert report["param_groups"][2]["patterns"] == "@head"
