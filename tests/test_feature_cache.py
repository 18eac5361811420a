"""Frozen-backbone feature cache: when it is on and why, and that a cached run is the uncached one, faster.

In-process runs of `lightning_project.train.train` on 32 px images; no timing is asserted (see
benchmarks/feature_cache.py for the speed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose_train, make_image_folder

from lightning_project.data import create_datamodule
from lightning_project.data.feature_cache import (
    FeatureCache,
    cache_key,
    decide,
    parse_setting,
    random_steps,
    stochastic_layers,
)
from lightning_project.data.transforms import build_pipeline
from lightning_project.errors import UserError
from lightning_project.models import ClassifierModule
from lightning_project.models.backbones import build_network
from lightning_project.train import build_datamodule, build_module, train

QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "model.pretrained=false", "trainer.num_sanity_val_steps=0",
         "data.image_size=32"]
CACHED = ["finetune=feature_extractor", "augment=none"]


def report(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# ---- eligibility --------------------------------------------------------------------------------
def test_random_steps_name_what_makes_a_pipeline_random():
    spec = lambda *names: {n: {"_target_": n, **args} for n, args in names}  # noqa: E731
    mean, std = [0.5] * 3, [0.5] * 3
    assert random_steps(build_pipeline(spec(("Resize", {"size": 32}), ("CenterCrop", {"size": 32})), mean, std)) == []
    assert random_steps(build_pipeline(spec(("RandomResizedCrop", {"size": 32}), ("Resize", {"size": 32}),
                                            ("ColorJitter", {"brightness": 0.2})), mean, std)) == [
        "RandomResizedCrop", "ColorJitter"]
    # an unknown transform counts as random, nested pipelines are searched
    lam = build_pipeline({"f": {"_target_": "Lambda", "lambd": abs}}, mean, std)
    assert random_steps(lam) == ["Lambda (not known to be deterministic)"]
    from torchvision.transforms import v2
    assert random_steps(v2.Compose([v2.Compose([v2.RandomHorizontalFlip()]), v2.Resize(8)])) == ["RandomHorizontalFlip"]


@pytest.mark.parametrize(
    "kwargs, use, reason",
    [
        ({}, True, "kept in memory"),
        ({"setting": "disk"}, True, "kept in memory and disk"),
        ({"setting": False}, False, "finetune.feature_cache=false"),
        ({"backbone_frozen": False, "strategy": "partial"}, False,
         "parameters before the head train (finetune.strategy=partial)"),
        ({"bn_batch_stats": True}, False, "finetune.freeze_bn_stats=false"),
        ({"train_random": ["RandomResizedCrop"]}, False,
         "training batches are random (RandomResizedCrop); augment=none"),
        ({"eval_random": ["RandomCrop"]}, False, "evaluation transforms are random (RandomCrop)"),
    ],
)
def test_decide(kwargs, use, reason):
    args = {"setting": "auto", "backbone_frozen": True, **kwargs}
    decision = decide(args.pop("setting"), **args)
    assert decision.use is use and reason in decision.reason


def test_setting_values():
    values = ("auto", "disk", False, "false", "AUTO")
    assert [parse_setting(v) for v in values] == ["auto", "disk", "false", "false", "auto"]
    with pytest.raises(UserError, match=r"finetune.feature_cache='memory': choose auto .*disk .*false"):
        parse_setting("memory")


@pytest.mark.parametrize(
    "overrides, use, reason",
    [
        (["finetune=full", "augment=none"], False, "parameters before the head train (finetune.strategy=full)"),
        (["finetune=partial", "augment=none"], False, "parameters before the head train (finetune.strategy=partial)"),
        (["finetune=feature_extractor"], False, "training batches are random (RandomResizedCrop); augment=none"),
        ([*CACHED, "augment.mixup_alpha=0.2"], False, "training batches are random (MixUp/CutMix batches)"),
        (["finetune=feature_extractor", "augment=none", "finetune.freeze_bn_stats=false"], False, "batch statistics"),
        (["finetune=feature_extractor", "augment=none", "finetune.feature_cache=false"], False, "=false"),
        (CACHED, True, "frozen backbone and deterministic transforms"),
    ],
)
def test_plan_for_configured_runs(overrides, use, reason, tmp_path, caplog):
    cfg = compose_train([*QUIET, *overrides], tmp_path)
    datamodule = build_datamodule(cfg, [0.5] * 3, [0.5] * 3)
    module = build_module(cfg, datamodule, [0.5] * 3, [0.5] * 3)
    with caplog.at_level(logging.INFO, logger="lightning_project"):
        cache = FeatureCache.plan(module, datamodule, cfg.finetune.feature_cache)
    assert cache.used is use and reason in cache.decision.reason
    lines = [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]
    if "=false" in reason:
        assert lines == []  # switched off by the user: nothing to explain
    else:
        assert lines == [f"feature cache {'on' if use else 'off'}: {cache.decision.reason}"]


def test_cached_loader_draws_with_the_class_balanced_sampler():
    """data.sampler=balanced draws indices only: the feature loader reuses the image loader's sampler."""
    from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

    from lightning_project.data.feature_cache import Decision

    cache = FeatureCache(Decision(True, "frozen"))
    cache._checked, cache._data = True, {"train": TensorDataset(torch.randn(10, 4), torch.arange(10) % 2)}
    sampler = WeightedRandomSampler(torch.ones(10), num_samples=10)
    images = DataLoader(TensorDataset(torch.zeros(10, 3)), batch_size=4, sampler=sampler, drop_last=True)
    features = cache._loader("train", images)
    assert features.sampler is sampler and features.batch_size == 4 and features.drop_last


def test_stochastic_layers_before_the_head_are_named():
    net, head = build_network("mobilenet_v3_small", 10, head_dropout=0.3)
    assert stochastic_layers(net, head) == ["classifier.2"]  # the head's own dropout stays (it runs in cached mode)


# ---- a cached run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cached_run(tmp_path_factory) -> Path:
    """ResNet-18 (random weights) as a frozen feature extractor on digits: 4 cached epochs."""
    run = tmp_path_factory.mktemp("cached") / "run"
    cfg = compose_train([*QUIET, *CACHED, "trainer.max_epochs=4", "optim.lr=0.05", "data.batch_size=64",
                          "trainer.limit_test_batches=2"], run)
    train(cfg)
    return run


@pytest.mark.slow
def test_cached_run_trains_and_reports_the_cache(cached_run):
    r = report(cached_run)
    cache = r["feature_cache"]
    assert cache["used"] is True and cache["setting"] == "auto" and len(cache["key"]) == 64
    assert cache["feature_shape"] == [512] and cache["samples"] == {"train": 1257, "val": 270}
    assert 0 < cache["extraction_seconds"] < r["timings"]["fit_seconds"]  # extraction is part of fit
    accs = [row["val/acc"] for row in r["history"]]
    assert len(accs) == 4 and accs[-1] > accs[0] and accs[-1] > 0.5, accs  # chance is 0.1
    assert r["epochs"] == 4 and r["global_step"] == 4 * (1257 // 64)
    assert (cached_run / "checkpoints" / "last.ckpt").is_file() and Path(r["best_checkpoint"]).is_file()
    assert 0 < r["metrics"]["test/acc"] <= 1 and (cached_run / "confusion_matrix.png").is_file()


@pytest.fixture(scope="module")
def reloaded(cached_run):
    """The best checkpoint reloaded without Hydra, and the data module it names (same split)."""
    best = report(cached_run)["best_checkpoint"]
    module = ClassifierModule.load_from_checkpoint(best, map_location="cpu").eval()
    raw = torch.load(best, map_location="cpu", weights_only=True)
    datamodule = create_datamodule(raw["lightning_project"]["datamodule_target"], **raw["datamodule_hyper_parameters"])
    return module, datamodule, raw


@pytest.mark.slow
def test_checkpoint_is_the_full_network_and_its_test_metrics_come_from_images(cached_run, reloaded):
    module, datamodule, raw = reloaded
    assert raw["lightning_project"]["datamodule_target"] == "lightning_project.data.datamodules.DigitsDataModule"
    fresh, _ = build_network("resnet18", 10)
    assert set(raw["state_dict"]) == {f"net.{k}" for k in fresh.state_dict()}  # backbone included
    assert module.feature_input is False
    datamodule.setup("test")
    right = total = 0
    with torch.no_grad():
        for (x, y), _ in zip(datamodule.test_dataloader(), range(2)):  # the run tested 2 batches
            assert x.shape[1:] == (3, 32, 32)  # images, through the whole network
            right += (module(x).argmax(1) == y).sum().item()
            total += len(y)
    assert right / total == pytest.approx(report(cached_run)["metrics"]["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_cached_validation_equals_uncached_for_the_same_weights(reloaded):
    module, datamodule, _ = reloaded
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=3)
    images = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    cache = FeatureCache.plan(module, datamodule, "auto")
    assert cache.used
    with cache.serving(module, datamodule):
        features = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    assert module.feature_input is False and "val_dataloader" not in vars(datamodule)  # restored
    assert cache.report()["samples"] == {"val": 270}  # validate needs only the val features
    assert features["val/acc"] == images["val/acc"] > 0.5
    for key in ("val/loss", "val/f1", "val/top5"):
        assert features[key] == pytest.approx(images[key], abs=1e-5), key


# ---- cached training is uncached training ---------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("img") / "images", per_class=12, size=32)


@pytest.mark.slow
def test_cached_training_repeats_uncached_training(folder, tmp_path):
    """ResNet has no frozen Dropout: the same seed gives the same shuffles, losses and weights; a
    second run pointed at the first one's cache folder (finetune.feature_cache_dir) loads the features."""
    recipe = [*QUIET, *CACHED, "data=imagefolder", f"data.root={folder}", "data.num_workers=0", "data.batch_size=8",
              "trainer.max_epochs=2", "optim.lr=0.05"]
    runs = {"false": tmp_path / "false", "disk": tmp_path / "disk"}
    shared = f"finetune.feature_cache_dir={runs['disk'] / 'feature_cache'}"
    reports = {}
    for setting, run in [*runs.items(), ("again", tmp_path / "again")]:
        train(compose_train([*recipe, f"finetune.feature_cache={'disk' if setting == 'again' else setting}", shared],
                            run))
        reports[setting] = report(run)
    plain, cached, again = reports["false"], reports["disk"], reports["again"]
    assert plain["feature_cache"] == {"setting": "false", "used": False, "reason": "finetune.feature_cache=false"}
    assert cached["feature_cache"]["loaded_from_disk"] == {"train": False, "val": False}
    assert again["feature_cache"]["loaded_from_disk"] == {"train": True, "val": True}
    assert again["feature_cache"]["key"] == cached["feature_cache"]["key"]
    assert sorted(p.name.split("-")[0] for p in (runs["disk"] / "feature_cache").glob("*.pt")) == ["train", "val"]
    assert plain["global_step"] == cached["global_step"] == 2 * (plain["split_sizes"]["train"] // 8)
    for other in (cached, again):
        for a, b in zip(plain["history"], other["history"], strict=True):
            for key in ("train/loss", "val/loss", "val/acc"):
                assert b[key] == pytest.approx(a[key], abs=1e-4), key
        for key in ("test/loss", "test/acc"):
            assert other["metrics"][key] == pytest.approx(plain["metrics"][key], abs=1e-4), key
    last = {s: torch.load(runs[s] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for s in runs}
    assert last["false"]["state_dict"].keys() == last["disk"]["state_dict"].keys()
    for name, tensor in last["false"]["state_dict"].items():
        assert torch.allclose(tensor.float(), last["disk"]["state_dict"][name].float(), atol=1e-5), name


def test_cache_key_follows_weights_and_data(tmp_path):
    def key(*overrides):
        cfg = compose_train([*QUIET, *CACHED, *overrides], tmp_path)
        torch.manual_seed(cfg.seed)  # as train() does: the random weights follow the seed
        datamodule = build_datamodule(cfg, [0.5] * 3, [0.5] * 3)
        module = build_module(cfg, datamodule, [0.5] * 3, [0.5] * 3)
        return cache_key(module, datamodule), module, datamodule

    first, module, datamodule = key()
    assert key()[0] == first  # same seed: same weights, same split
    with torch.no_grad():
        module.net.fc.weight.add_(1.0)  # the head is not part of the features
    assert cache_key(module, datamodule) == first
    with torch.no_grad():
        module.net.layer4[1].bn2.running_mean.add_(1.0)
    assert cache_key(module, datamodule) != first
    assert key("data.image_size=40")[0] != first
    assert key("seed=1")[0] != first  # other weights and another split
