"""`python -m lightning_project.tune`: the checks, their numbers, the report, the plots, the errors.

Most runs are in-process (compose_train + tune()) on ResNet-18 at 32 px with few steps; one test
runs the real command.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train, run_command

from lightning_project.errors import UserError
from lightning_project.models.backbones import normalization
from lightning_project.train import build_datamodule, build_module
from lightning_project.tune import build_fabric, tune
from lightning_project.tuning import TuneOptions, checks, lr_finder
from lightning_project.tuning.options import BatchSize, OverfitBatch
from lightning_project.tuning.report import CheckResult, overall_status, suggestions, train_command
from lightning_project.utils.summary import jsonable

PNG = b"\x89PNG\r\n\x1a\n"
# offline, quiet, tiny: ResNet-18 at 32 px, small batches, few steps of every check
TINY = [
    "model.pretrained=false", "trainer=cpu", "trainer.enable_progress_bar=false", "data.image_size=32",
    "data.batch_size=16", "tune.initial_loss.batches=2", "tune.overfit_batch.max_steps=40",
    "tune.lr_finder.num_steps=16", "tune.lr_finder.min_lr=1e-5", "tune.lr_finder.smoothing=0.5",
    "tune.batch_size.max_trials=3", "tune.batch_size.steps_per_trial=1",
]


# ---- the whole command in-process, with three parameter groups --------------------------------------
@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> tuple[Path, dict, str]:
    """ResNet-18 with optim=sgd_groups (body 1e-4, neck 5e-4, head 1e-3), every check, tune.apply=true."""
    run = tmp_path_factory.mktemp("tune_groups")
    cfg = compose_train(["optim=sgd_groups", "tune.overfit_batch.lr=0.01", "tune.apply=true", *TINY], run, name="tune")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        report = tune(cfg)
    return run, report, stdout.getvalue()


@pytest.mark.slow
def test_report_file_and_plots(grouped):
    run, report, _ = grouped
    saved = json.loads((run / "tune_report.json").read_text())
    assert list(saved["checks"]) == ["initial_loss", "overfit_batch", "lr_finder", "batch_size"]
    assert saved["device"] == "cpu" and saved["model"] == "resnet18" and saved["num_classes"] == 10
    assert saved["status"] == "warn"  # the worst check: on CPU the batch-size search stops at its bound
    assert [g["group"] for g in saved["param_groups"]] == ["body", "neck", "head"]
    for name, check in saved["checks"].items():
        assert check["status"] in ("ok", "warn", "fail") and check["message"] and check["seconds"] > 0, name
    assert saved["checks"]["lr_finder"]["value"] == pytest.approx(report["checks"]["lr_finder"]["value"])
    for png in ("lr_finder.png", "overfit_batch.png"):
        assert (run / png).read_bytes()[:8] == PNG
    assert "task_name: tune" in (run / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_initial_loss_is_near_ln_classes(grouped):
    check = grouped[1]["checks"]["initial_loss"]
    assert check["status"] == "ok"
    assert check["details"]["ln_classes"] == pytest.approx(math.log(10))
    assert 0.8 * math.log(10) < check["value"] < 1.25 * math.log(10)  # a fresh head guesses
    assert check["details"]["ratio"] == pytest.approx(check["value"] / math.log(10))
    assert check["details"]["images"] == 32 and check["details"]["accuracy"] < 0.4


@pytest.mark.slow
def test_overfit_one_batch_reaches_the_target(grouped):
    check = grouped[1]["checks"]["overfit_batch"]
    assert check["status"] == "ok", check["message"]
    curve = check["details"]["curve"]
    assert curve[0] > 1.5 and curve[-1] < 0.05 and min(curve[:-1]) >= 0.05
    assert check["details"]["steps_to_target"] == len(curve) - 1 <= 40
    assert check["value"] == pytest.approx(curve[-1]) and check["details"]["batch_size"] == 16
    assert check["details"]["lr"] == 0.01  # tune.overfit_batch.lr: the base lr, the groups at their ratios
    assert f"in {len(curve) - 1} steps" in check["message"]


@pytest.mark.slow
def test_lr_finder_keeps_the_group_ratios(grouped):
    check = grouped[1]["checks"]["lr_finder"]
    details = check["details"]
    curve = details["curve"]
    base = curve["base_lr"]
    assert details["ratios"] == pytest.approx({"body": 0.1, "neck": 0.5, "head": 1.0})
    assert base[0] == pytest.approx(1e-5) and len(base) >= 5
    assert np.allclose(np.diff(np.log(base)), math.log(1e5) / 15)  # exponential: 16 steps from 1e-5 to 1
    for step, lr in enumerate(base):  # what the optimizer really held, read back at every step
        assert curve["group_lr"]["head"][step] == pytest.approx(lr)
        assert curve["group_lr"]["neck"][step] == pytest.approx(0.5 * lr)
        assert curve["group_lr"]["body"][step] == pytest.approx(0.1 * lr)
    assert details["stopped_early"] and len(base) < 16  # SGD diverges well before a base lr of 1
    assert curve["smoothed"][-1] > 4 * min(curve["smoothed"])
    steepest, minimum = lr_finder.suggest(base, curve["smoothed"])  # the saved curve gives the saved answer
    lr = check["value"]
    assert steepest is not None  # a fresh head on digits: the loss falls before it diverges
    assert lr == base[steepest] < base[minimum] and f"optim.lr={lr:.3g}" in check["message"]
    assert details["group_lrs_at_suggestion"] == pytest.approx({"body": 0.1 * lr, "neck": 0.5 * lr, "head": lr})
    assert details["min_loss_lr_div10"] == pytest.approx(base[minimum] / 10)


@pytest.mark.slow
def test_batch_size_finder_doubles_within_max_trials(grouped):
    run, report, _ = grouped
    check = report["checks"]["batch_size"]
    assert check["value"] == 8  # 2, 4, 8: three trials, a CPU never runs out of memory first
    assert check["status"] == "warn" and "search bound" in check["message"]  # said, not passed off as memory
    assert check["details"]["device"] == "cpu" and check["details"]["max_trials"] == 3
    assert report["batch_size"] == 16  # the data module's own value is restored after the search
    assert "data.batch_size" not in report["suggested"]  # a bound is no memory limit to apply
    assert not list(run.glob(".scale_batch_size_*.ckpt"))  # Lightning's temporary checkpoint is gone


# ---- single checks on a module built as train builds it -----------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = compose_train(["model.pretrained=false", "trainer=cpu", "data.image_size=32"],
                        tmp_path_factory.mktemp("built"), name="tune")
    mean, std = normalization(cfg.model.name, cfg.model.weights)
    datamodule = build_datamodule(cfg, mean, std)
    module = build_module(cfg, datamodule, mean, std)
    datamodule.setup("fit")
    batch = checks.fixed_batch(datamodule.train_dataloader().dataset, 16, seed=0)
    return build_fabric(cfg), module, batch, float(cfg.optim.lr)


@pytest.mark.slow
def test_overfit_failures_say_why(built):
    fabric, module, batch, lr = built
    before = {k: v.clone() for k, v in module.state_dict().items()}
    short = checks.overfit_batch(fabric, module, batch, lr, OverfitBatch(max_steps=2))
    assert short.status == "fail" and short.details["steps"] == 2 and short.details["steps_to_target"] is None
    assert short.value > 0.05 and "tune.overfit_batch.max_steps" in short.message
    tiny = checks.overfit_batch(fabric, module, batch, lr, OverfitBatch(max_steps=3, lr=1e-7))
    assert tiny.status == "fail" and "far too small" in tiny.message
    assert tiny.details["lr"] == pytest.approx(1e-7)
    assert abs(tiny.details["final"] - tiny.details["initial"]) < 0.05 * tiny.details["initial"]
    after = module.state_dict()  # the checks train copies: later checks start from the same weights
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = np.logspace(-6, 0, 61)
    x = np.log10(lrs)
    loss = 2.3 - 2.0 / (1 + np.exp(-3 * (x + 3)))  # falls fastest at 1e-3
    loss = np.where(x > -1, loss + 40 * (x + 1) ** 2, loss)  # diverges past 0.1
    steepest, minimum = lr_finder.suggest(list(lrs), list(loss))
    assert lrs[steepest] == pytest.approx(1e-3, rel=0.3)
    assert lrs[minimum] == pytest.approx(0.1, rel=0.3)
    rising = list(np.linspace(2.3, 9.0, 20))
    assert lr_finder.suggest(list(lrs[:20]), rising) == (None, 0)


def test_train_command_keeps_the_users_overrides():
    overrides = ["model=vgg16", "optim=sgd_groups", "optim.lr=0.1", "tune.apply=true", "hydra.run.dir=/tmp/x",
                 "data.root=/my images"]
    command = train_command(overrides, {"optim.lr": 0.03562, "data.batch_size": 128})
    assert command == ("python -m lightning_project.train model=vgg16 optim=sgd_groups 'data.root=/my images' "
                       "optim.lr=0.0356 data.batch_size=128")


def test_only_measured_values_are_suggested():
    lr = CheckResult("lr_finder", "ok", 0.004, "", "")
    bounded = CheckResult("batch_size", "warn", 128, "", "", {"memory_bound": False})
    fits = CheckResult("batch_size", "ok", 512, "", "", {"memory_bound": True})
    failed = CheckResult("overfit_batch", "fail", 1.7, "", "")
    assert suggestions([lr, bounded]) == {"optim.lr": 0.004}
    assert suggestions([fits, lr]) == {"data.batch_size": 512, "optim.lr": 0.004}
    assert overall_status([lr, bounded]) == "warn" and overall_status([failed, lr, bounded]) == "fail"
    assert overall_status([lr]) == "ok"


def test_report_json_has_no_nan():
    diverged = {"curve": [2.3, float("nan"), float("inf")], "value": float("-inf"), "steps": 2}
    assert jsonable(diverged) == {"curve": [2.3, None, None], "value": None, "steps": 2}


def test_max_trials_auto_is_bounded_by_the_device():
    assert BatchSize().trials("cpu") == 7 and BatchSize().trials("cuda") == 12
    assert BatchSize(max_trials=4).trials("cpu") == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.lr_finder.min_lr=1.0", "tune.lr_finder.min_lr=1 >= max_lr=1: the sweep goes from min_lr up to max_lr"),
        ("tune.overfit_batch.max_steps=-3", "tune.overfit_batch.max_steps=-3: must be a positive integer"),
        ("tune.checks=[initial_loss,lr_find]", "tune.checks: unknown check 'lr_find'; choose from initial_loss, "
         "overfit_batch, lr_finder, batch_size (closest: lr_finder)"),
        ("tune.batch_size.mode=linear", "tune.batch_size.mode='linear': choose power or binsearch"),
        ("tune.lr_finder.smoothing=1.0", "tune.lr_finder.smoothing=1.0: must be in [0, 1) (0 = raw losses)"),
        ("tune.overfit_batch.batch_size=1",
         "tune.overfit_batch.batch_size=1: give at least 2 (BatchNorm in train mode needs two values)"),
    ],
)
def test_bad_tune_values_fail_before_any_work(override, message, tmp_path):
    cfg = compose_train(["model.pretrained=false", override], tmp_path, name="tune")
    with pytest.raises(UserError) as raised:
        tune(cfg)
    assert str(raised.value) == message
    assert not (tmp_path / ".hydra").exists()  # nothing built, nothing written


def test_tune_options_defaults_match_the_config(tmp_path):
    cfg = compose_train([], tmp_path, name="tune")
    from lightning_project.utils.config import plain

    options = TuneOptions.from_dict(plain(cfg.tune))
    assert options == TuneOptions()  # conf/tune.yaml and the dataclass defaults say the same
    assert cfg.task_name == "tune" and cfg.optim.lr == 0.02 and cfg.data.batch_size == 64  # train's recipe


@pytest.mark.slow
def test_apply_prints_the_train_command(grouped):
    _, report, stdout = grouped
    lr = report["suggested"]["optim.lr"]
    assert lr == report["checks"]["lr_finder"]["value"]
    line = next(x for x in stdout.splitlines() if x.startswith("python -m lightning_project.train"))
    assert line == report["train_command"]
    assert line.startswith("python -m lightning_project.train optim=sgd_groups model.pretrained=false trainer=cpu")
    assert line.endswith(f"data.batch_size=16 optim.lr={lr:.3g}") and "tune." not in line


# ---- the real command ------------------------------------------------------------------------------
@pytest.mark.slow
def test_command_writes_its_run_directory(tmp_path, env):
    run_command("tune", *TINY, "tune.checks=[initial_loss]", "tune.initial_loss.batches=1", env=env, cwd=tmp_path)
    (report_path,) = (tmp_path / "logs" / "tune" / "runs").glob("*/tune_report.json")
    report = json.loads(report_path.read_text())
    assert list(report["checks"]) == ["initial_loss"] and report["checks"]["initial_loss"]["details"]["images"] == 16
    assert report["suggested"] == {} and report["train_command"] is None
    assert "task_name: tune" in (report_path.parent / ".hydra" / "config.yaml").read_text()
