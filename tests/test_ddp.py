"""Data parallel training on two CPU processes (gloo): the same result as one process, one run directory,
and DDP inside a Hydra multirun (each job starts its own processes, for itself only)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import FAST, compose_train, metrics, run_command
from conftest import train as train_command

from lightning_project.train import train

pytestmark = pytest.mark.slow

# the head of a frozen ResNet-18 (its BatchNorm in eval mode) on the digits in their order, without random
# augmentation: two processes of 8 images per step see exactly the images of one process's 16
EXACT = [*FAST, "finetune=feature_extractor", "augment=none", "data.shuffle=false",
         "trainer.limit_train_batches=4", "trainer.max_epochs=2", "trainer.limit_val_batches=4",
         "trainer.limit_test_batches=4", "data.num_workers=0", "trainer.log_every_n_steps=1", "seed=3"]


def head(run_dir) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.fc.")}


@pytest.mark.parametrize("cache", ["false", "auto"], ids=["backbone-every-step", "feature-cache"])
def test_two_processes_train_as_one_with_twice_the_batch(tmp_path, env, cache):
    """Gradients averaged over the processes, metrics synchronised across them, one run directory; with the
    backbone run every step, and with the head trained on cached features."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    exact = [*EXACT, f"finetune.feature_cache={cache}"]
    train(compose_train([*exact, "data.batch_size=16", "data.eval_batch_size=16"], single))
    train_command(ddp, "trainer=ddp_cpu", *exact, "data.batch_size=8", "data.eval_batch_size=8", env=env)
    assert metrics(ddp)["feature_cache"]["used"] is (cache == "auto") is metrics(single)["feature_cache"]["used"]
    one, two = head(single), head(ddp)
    assert one.keys() == two.keys() == {"net.fc.weight", "net.fc.bias"}
    for name in one:  # the same weights after 8 steps: DDP's average of two half-batch gradients
        assert torch.allclose(one[name], two[name], atol=1e-5), (name, (one[name] - two[name]).abs().max())
    a, b = metrics(single), metrics(ddp)
    # every split's metrics over all of its images (each process saw half): synchronised, not rank 0's half
    for name in ("train/loss", "val/loss", "val/acc", "val/f1", "test/acc", "test/loss"):
        assert a["metrics"][name] == pytest.approx(b["metrics"][name], abs=1e-4), name
    assert [e["val/acc"] for e in a["history"]] == pytest.approx([e["val/acc"] for e in b["history"]], abs=1e-6)
    assert b["global_step"] == a["global_step"] == 8
    # rank 0 alone writes: one metrics.json, one set of checkpoints, one config, no second run directory
    assert [p.relative_to(ddp).as_posix() for p in ddp.rglob("metrics.json")] == ["metrics.json"]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["best-epoch001.ckpt", "last.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]


def test_ddp_inside_a_multirun_runs_each_job_once(tmp_path, env):
    """`train -m --config-dir DIR ... trainer=ddp_cpu optim.lr=a,b`: Lightning alone would rerun the whole sweep in
    each extra process. Here each job's extra process runs that job (its overrides, the same config sources), a
    job that fails (NaN at lr 1e30) is recorded and the next one still starts its processes."""
    sweep, mine = tmp_path / "multirun", tmp_path / "my_conf" / "augment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("defaults:\n  - none\n  - _self_\n")  # a user's own augment preset
    run_command("train", "-m", "--config-dir", str(tmp_path / "my_conf"), "augment=mine", "trainer=ddp_cpu",
                "optim.lr=0.01,1e30,0.05", "scheduler=constant", "optim.scale_lr=linear", "optim.base_batch_size=8",
                "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                "trainer.max_epochs=1", "data.batch_size=8", "data.num_workers=0", f"hydra.sweep.dir={sweep}", *FAST,
                env=env, cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1", "2"]  # no job run twice, no stray directories
    for job, lr in ((jobs[0], 0.01), (jobs[2], 0.05)):
        report = metrics(job)
        assert report["global_step"] == 2 and report["metrics"]["test/acc"] >= 0
        # two processes of 8: a global batch of 16, twice base_batch_size
        assert (report["lr_scaling"]["processes"], report["lr_scaling"]["factor"]) == (2, 2.0)
        assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
        config = (job / ".hydra" / "overrides.yaml").read_text()
        assert f"optim.lr={lr}" in config and "trainer=ddp_cpu" in config
        # the second process ran this job: its own log in this job's directory, with the job's settings
        log = (job / "train_ddp_rank1.log").read_text()
        assert "Could not" not in log and (job / "train_ddp_rank1.log").stat().st_size > 0
    failure = json.loads((jobs[1] / "failure.json").read_text())
    assert failure["error"].startswith("train/loss is ") and not (jobs[1] / "metrics.json").exists()
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"]: r["status"] for r in rows} == {"0": "completed", "1": "failed", "2": "completed"}
    assert not list(tmp_path.glob("logs"))  # the extra processes wrote nowhere else
