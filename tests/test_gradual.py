"""Gradual unfreezing through the real training function: schedulers, frozen tensors, resume, DDP."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import ROOT, compose_train
from conftest import train as train_command
from torch.optim import SGD, lr_scheduler

from lightning_project.optim.schedulers import WarmupSchedule
from lightning_project.train import train

pytestmark = pytest.mark.slow

TINY = ["logger=csv", "trainer.enable_progress_bar=false", "model.pretrained=false", "trainer.num_sanity_val_steps=0",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "data.batch_size=16", "trainer.log_every_n_steps=1", "finetune=gradual"]
STEPS = 3  # per epoch


def run(tmp_path, *overrides):
    probe = tmp_path / "probe"
    cfg = compose_train([*TINY, "+callbacks.probe._target_=probes.Probe", f"+callbacks.probe.out={probe}",
                         *overrides], tmp_path)
    train(cfg)
    return json.loads((probe / "rank0.json").read_text()), probe


def weights(probe, tag, rank=0):
    return torch.load(probe / f"rank{rank}_{tag}.pt", weights_only=True)


def block(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def onecycle(tmp_path_factory):
    """Gradual unfreezing under OneCycle, with SGD momentum and weight decay on."""
    tmp = tmp_path_factory.mktemp("gradual_onecycle")
    return run(tmp, "scheduler=onecycle", "finetune.milestones=[1,2]", "trainer.max_epochs=3", "finetune.lr_decay=0.5")


def expected_factor(scheduler: str, step: int, total: int) -> float:
    """The schedule as torch computes it alone, for a group of lr 1."""
    opt = SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    if scheduler == "onecycle":
        sched = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total)
    else:
        sched = lr_scheduler.LambdaLR(opt, WarmupSchedule("cosine", total, STEPS))
    for _ in range(step):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "plateau"])
def test_every_group_follows_the_schedule_while_blocks_unfreeze(scheduler, onecycle, tmp_path):
    record, _ = onecycle if scheduler == "onecycle" else run(
        tmp_path, f"scheduler={scheduler}", "finetune.milestones=[1,2]", "trainer.max_epochs=3",
        "finetune.lr_decay=0.5", *(["scheduler.patience=0", "scheduler.threshold=10"] if scheduler == "plateau" else []),
    )
    assert record["trainable"] == {"0": ["fc"], "1": ["fc", "layer4"],
                                   "2": ["bn1", "conv1", "fc", "layer1", "layer2", "layer3", "layer4"]}
    lrs = record["lrs"]
    assert len(lrs) == 3 * STEPS and all(step.keys() == lrs[0].keys() for step in lrs)  # every group from step 0
    base = {name: lr / lrs[0]["head"] for name, lr in lrs[0].items()}
    assert base["layer4"] == pytest.approx(0.5) and base["layer3"] == pytest.approx(0.25)
    for step, values in enumerate(lrs):
        for name, lr in values.items():  # ratios between groups never change
            assert lr / values["head"] == pytest.approx(base[name])
        if scheduler != "plateau":
            assert values["head"] == pytest.approx(0.02 * expected_factor(scheduler, step, 3 * STEPS))
    heads = [v["head"] for v in lrs]
    if scheduler == "plateau":  # threshold=10: never an improvement, so each epoch end cuts the lr 10x
        assert heads[0] == pytest.approx(0.02) and heads[STEPS] == pytest.approx(0.002)
        assert heads[2 * STEPS] == pytest.approx(0.0002)


def test_frozen_blocks_are_bit_identical_until_their_milestone(onecycle):
    _, probe = onecycle
    start, e0, e1, e2 = (weights(probe, t) for t in ("start", "epoch0", "epoch1", "epoch2"))
    assert not same(block(start, "fc."), block(e0, "fc."))
    for prefix in ("layer4.", "layer3.", "layer1.", "bn1.", "conv1."):  # weights and BatchNorm statistics
        assert same(block(start, prefix), block(e0, prefix)), prefix
    assert not same(block(start, "layer4."), block(e1, "layer4."))
    for prefix in ("layer3.", "layer1.", "bn1.", "conv1."):
        assert same(block(start, prefix), block(e1, prefix)), prefix
        assert not same(block(start, prefix), block(e2, prefix)), prefix


def test_resuming_mid_schedule_restores_the_frozen_set_and_groups(tmp_path):
    common = ["scheduler=cosine", "finetune.milestones=[1,3]", "finetune.lr_decay=0.5", "trainer.max_epochs=4"]
    first, probe = run(tmp_path / "a", *common, "+callbacks.probe.stop_after_epoch=1")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    second, probe_b = run(tmp_path / "b", *common, f"ckpt_path={last}")
    assert set(second["trainable"]) == {"2", "3"}  # the resumed run starts at epoch 2
    assert second["trainable"]["2"] == ["fc", "layer4"] == first["trainable"]["1"]
    assert second["trainable"]["3"] == ["bn1", "conv1", "fc", "layer1", "layer2", "layer3", "layer4"]
    assert second["lrs"][0].keys() == first["lrs"][0].keys()
    assert second["lrs"][0]["head"] == pytest.approx(0.02 * expected_factor("cosine", 2 * STEPS, 4 * STEPS))
    resumed, end2 = weights(probe, "epoch1"), weights(probe_b, "epoch2")
    assert same(block(resumed, "layer3."), block(end2, "layer3."))  # still frozen in epoch 2
    assert not same(block(resumed, "layer4."), block(end2, "layer4."))


def test_gradual_with_the_last_milestone_past_the_end_is_an_error(tmp_path):
    from lightning_project.errors import UserError

    cfg = compose_train([*TINY, "trainer.max_epochs=3"], tmp_path)  # gradual's default milestones [2,4,6]
    with pytest.raises(UserError, match=r"finetune.milestones=\[2, 4, 6\]: the last milestone .* trainer.max_epochs=3"):
        train(cfg)


def test_gradual_under_ddp_keeps_later_unfrozen_blocks_in_sync(tmp_path, env):
    """Two CPU processes (gloo): layer4 unfreezes at epoch 1, after DDP wrapped the model."""
    probe = tmp_path / "probe"
    run_dir = tmp_path / "run"
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])}
    train_command(run_dir, "trainer=ddp_cpu", *TINY[4:], "finetune.milestones=[1]", "trainer.max_epochs=2",
                  "+callbacks.probe._target_=probes.Probe", f"+callbacks.probe.out={probe}", env=env)
    start = weights(probe, "start")
    params = {n for n in start if not any(s in n for s in ("running_", "num_batches"))}  # BN statistics stay local
    for tag in ("epoch0", "epoch1"):
        a, b = weights(probe, tag, 0), weights(probe, tag, 1)
        assert all(torch.equal(a[n], b[n]) for n in params), tag
    e0, e1 = weights(probe, "epoch0"), weights(probe, "epoch1")
    assert same(block(start, "layer4."), block(e0, "layer4.")) and not same(block(e0, "layer4."), block(e1, "layer4."))
    report = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(report["metrics"]["test/acc"]) and len(list(run_dir.rglob("metrics.json"))) == 1
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # one set of checkpoints, from rank 0
    assert names[-1] == "last.ckpt" and len(names) == 2 and names[0].startswith("best-epoch")
