"""Optimizers over named groups and schedulers that treat every group right."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_project.errors import UserError
from lightning_project.optim import build_optimizer, build_scheduler
from lightning_project.optim.schedulers import WarmupSchedule


def groups(lrs=(1e-4, 5e-4, 1e-3)):
    return [{"name": f"g{i}", "params": [nn.Parameter(torch.zeros(2))], "lr": lr} for i, lr in enumerate(lrs)]


def trace(opt, cfg, steps):
    """Learning rate of every group at each optimizer step."""
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        cfg["scheduler"].step()
    return lrs


def test_misspelt_group_option_is_an_error():
    bad = groups()
    bad[0]["weight_decy"] = 0.1
    with pytest.raises(UserError, match=r"optim.groups.g0: SGD has no option weight_decy; options: .*weight_decay"):
        build_optimizer(bad, "SGD", lr=1e-3)


def test_unknown_optimizer_and_options():
    with pytest.raises(UserError, match=r"optim._target_: torch.optim has no 'Adamm'; close names: Adam"):
        build_optimizer(groups(), "Adamm")
    with pytest.raises(UserError, match="Adam rejects the options \\['momentum'\\]"):
        build_optimizer(groups(), "torch.optim.Adam", momentum=0.9)
    with pytest.raises(UserError, match="is not a torch.optim.Optimizer"):
        build_optimizer(groups(), "torch.nn.Linear")


def test_onecycle_peaks_at_each_groups_own_lr():
    opt = build_optimizer(groups(), "SGD", lr=1e-3, momentum=0.9)
    cfg = build_scheduler(opt, "onecycle", total_steps=20, steps_per_epoch=10, pct_start=0.25)
    assert cfg["interval"] == "step" and cfg["name"] == "lr"
    lrs = trace(opt, cfg, 20)
    peaks = [max(step[i] for step in lrs) for i in range(3)]
    assert peaks == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lrs[0] == pytest.approx([1e-4 / 25, 5e-4 / 25, 1e-3 / 25])


@pytest.mark.parametrize("shape", ["cosine", "linear"])
def test_warmup_then_decay_keeps_the_group_ratios(shape):
    opt = build_optimizer(groups(), "SGD", lr=1e-3)
    cfg = build_scheduler(opt, shape, total_steps=40, steps_per_epoch=10, warmup_epochs=1, min_lr_ratio=0.1)
    lrs = trace(opt, cfg, 40)
    head = [step[2] for step in lrs]
    assert head[:10] == sorted(head[:10]) and head[9] < 1e-3  # rising warm-up
    assert head[10] == pytest.approx(1e-3)
    assert head[10:] == sorted(head[10:], reverse=True) and head[-1] >= 1e-4 - 1e-12
    for step in lrs:
        assert step[0] / step[2] == pytest.approx(0.1) and step[1] / step[2] == pytest.approx(0.5)


def test_inverse_sqrt_and_constant():
    assert WarmupSchedule("inverse_sqrt", 100, 4)(15) == pytest.approx(math.sqrt(4 / 16))
    assert WarmupSchedule("constant", 100, 0)(50) == 1.0


def test_epoch_schedulers_and_plateau():
    opt = build_optimizer(groups(), "SGD", lr=1e-3)
    step = build_scheduler(opt, "step", 100, 10, step_size=2, gamma=0.5)
    assert step["interval"] == "epoch"
    multi = build_scheduler(opt, "multistep", 100, 10, milestones=[1, 3], gamma=0.1)
    assert multi["scheduler"].milestones == {1: 1, 3: 1}
    plateau = build_scheduler(opt, "plateau", 100, 10, monitor="val/loss", mode="min", patience=1)
    assert plateau["monitor"] == "val/loss" and plateau["interval"] == "epoch"


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("cosin", {}, "scheduler.name='cosin': choose one of"),
        ("multistep", {"milestones": [5, 2]}, r"scheduler.milestones=\[5, 2\]: give increasing"),
        ("onecycle", {"warmup_epochs": 1},
         "scheduler.warmup_epochs: scheduler=onecycle does not take it; its options: anneal_strategy"),
        ("cosine", {"warmup_epochs": 5}, "50 warm-up steps but only 40 training steps"),
        ("step", {"step_sise": 3},
         "scheduler.step_sise: scheduler=step does not take it; its options: gamma, step_size"),
        ("none", {"pct_start": 0.3}, "scheduler.pct_start: scheduler=none does not take it; its options: none"),
        ("step", {}, "scheduler=step: unknown or missing option"),  # step_size is required
        ("onecycle", {}, "needs a finite number of training steps"),
    ],
)
def test_scheduler_errors(name, options, message):
    opt = build_optimizer(groups(), "SGD", lr=1e-3)
    total = math.inf if message.startswith("needs") else 40
    with pytest.raises(UserError, match=message):
        build_scheduler(opt, name, total_steps=total, steps_per_epoch=10, **options)


def test_warmup_schedule_survives_a_checkpoint_round_trip():
    opt = build_optimizer(groups(), "SGD", lr=1e-3)
    cfg = build_scheduler(opt, "cosine", total_steps=40, steps_per_epoch=10, warmup_epochs=1)
    for _ in range(15):
        opt.step()
        cfg["scheduler"].step()
    state = cfg["scheduler"].state_dict()
    opt2 = build_optimizer(groups(), "SGD", lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    cfg2 = build_scheduler(opt2, "cosine", total_steps=40, steps_per_epoch=10, warmup_epochs=1)
    cfg2["scheduler"].load_state_dict(state)
    opt.step(), opt2.step()
    cfg["scheduler"].step(), cfg2["scheduler"].step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


@pytest.mark.parametrize("rule, factor", [("linear", 4.0), ("sqrt", 2.0), (None, 1.0)])
def test_scale_lr_scales_every_group_by_the_global_batch(tmp_path, caplog, rule, factor):
    """Global batch 16 x 2 accumulated = 32 against base_batch_size 8: linear x4, sqrt x2; the groups keep
    their ratios (the head at lr, the body at lr x 0.1) and the schedule runs on the scaled lrs. With
    scheduler=none there is no warm-up: a raised lr is warned about."""
    import json

    from conftest import FAST, compose_train

    from lightning_project.train import train

    probe, run = tmp_path / "probe", tmp_path / "run"
    train(compose_train([
        *FAST, "optim=sgd_groups", "optim.lr=0.01", f"optim.scale_lr={'null' if rule is None else rule}",
        "optim.base_batch_size=8", "data.batch_size=16", "trainer.accumulate_grad_batches=2", "scheduler=none",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "trainer.max_epochs=1", "data.num_workers=0",
        "+callbacks.probe._target_=probes.Probe", f"+callbacks.probe.out={probe}"], run))
    lrs = json.loads((probe / "rank0.json").read_text())["lrs"][0]
    assert lrs["head"] == pytest.approx(0.01 * factor) and lrs["body"] == pytest.approx(0.001 * factor)
    scaling = json.loads((run / "metrics.json").read_text())["lr_scaling"]
    if rule is None:
        assert scaling is None
    else:
        assert scaling == {"rule": rule, "global_batch": 32, "per_device": 16, "processes": 1, "accumulate": 2,
                           "base_batch_size": 8, "factor": factor}
    warned = [r.getMessage() for r in caplog.records if "without a warm-up" in r.getMessage()]
    assert len(warned) == (rule is not None), warned
