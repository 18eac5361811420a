"""Nothing lost to a crash: atomic checkpoint files, resume=auto, SIGTERM/Ctrl-C checkpoints, NaN stops."""

from __future__ import annotations

import errno
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, compose_train

from lightning_project.callbacks import crash_safety
from lightning_project.callbacks.crash_safety import AtomicCheckpointIO
from lightning_project.errors import UserError
from lightning_project.train import train

SHORT = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
         "data.batch_size=16", "data.num_workers=0", *FAST]


def _failing_save(exception: BaseException):
    def save(obj, f):  # half a checkpoint reaches the disk, then the write fails
        f.write(b"\x80" * 1000)
        raise exception
    return save


@pytest.mark.parametrize("exception", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "killed-mid-write"])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, exception):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    monkeypatch.setattr(crash_safety.torch, "save", _failing_save(exception))
    expected = UserError if isinstance(exception, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as raised:
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    if expected is UserError:
        assert str(raised.value).startswith(f"no space left on the device of {path.parent} while saving last.ckpt")
    assert torch.load(path, weights_only=True)["step"] == 1  # the old file, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_non_finite_loss_stops_with_the_step_and_learning_rates(tmp_path):
    cfg = compose_train(["optim.lr=1e30", "scheduler=constant", "trainer.max_epochs=2", *SHORT], tmp_path)
    with pytest.raises(UserError) as raised:
        train(cfg)
    message = str(raised.value)
    assert message.startswith("train/loss is ") and " at step " in message
    assert re.search(r"with learning rates \{'default': '[0-9.]+e\+(29|30)', 'default:no_decay': ", message), message
    assert "last good checkpoint: none yet" in message
    assert "Lower optim.lr" in message


def test_the_deferred_nan_check_names_the_step_a_per_step_check_names(tmp_path):
    """The flag is read on logging steps only (log_every_n_steps=10 here, 6 batches: at the epoch's end), yet
    the message is the one a read every step gives: the first bad step, its batch and its learning rates."""
    recipe = ["optim.lr=1e30", "scheduler=constant", "trainer.max_epochs=2", *SHORT, "trainer.limit_train_batches=6",
              "data.batch_size=8", "trainer.log_every_n_steps=10"]
    messages = []
    for every in ("null", "1"):
        cfg = compose_train([*recipe, f"callbacks.stop_on_nan.check_every_n_steps={every}"], tmp_path / every)
        with pytest.raises(UserError) as raised:
            train(cfg)
        messages.append(str(raised.value))
    assert messages[0] == messages[1], messages
    assert not list((tmp_path / "null" / "checkpoints").glob("*.ckpt"))  # no checkpoint holds the NaN weights


def test_resume_auto_continues_and_a_used_run_directory_is_refused(tmp_path):
    run, recipe = tmp_path / "run", ["scheduler=constant", *SHORT]  # a schedule whose length may grow
    train(compose_train(["trainer.max_epochs=1", *recipe], run))
    with pytest.raises(UserError, match=rf"hydra.run.dir={run} already holds a run; rerun with resume=auto"):
        train(compose_train(["trainer.max_epochs=2", *recipe], run))
    train(compose_train(["trainer.max_epochs=2", "resume=auto", *recipe], run))
    report = json.loads((run / "metrics.json").read_text())
    assert report["epochs"] == 2 and report["global_step"] == 6  # epoch 0 was not trained again
    with pytest.raises(UserError, match="resume='yes': must be one of null, auto"):
        train(compose_train(["resume=yes", *SHORT], tmp_path / "other"))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path, env):
    """Preemption: SIGTERM mid-epoch -> last.ckpt of that step, exit 2 with one line; resume=auto finishes."""
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "trainer.max_epochs=2", "trainer.limit_train_batches=60", "data.batch_size=8",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "data.num_workers=0", *FAST]
    proc = subprocess.Popen([sys.executable, "-m", "lightning_project.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the end of epoch 0
    time.sleep(1.0)  # into epoch 1
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: stopped by SIGTERM at epoch 1, step "), stderr[-3000:]
    assert "Traceback" not in stderr
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 60 < step < 120  # saved mid-epoch 1, after epoch 0's 60 steps
    train(compose_train(args[1:] + ["resume=auto"], run))
    report = json.loads((run / "metrics.json").read_text())
    assert report["epochs"] == 2 and report["global_step"] == 120 and report["metrics"]["test/acc"] >= 0


@pytest.mark.slow
def test_killed_then_resumed_equals_uninterrupted(tmp_path, env):
    """SIGKILL after the first epoch's checkpoint, resume=auto: same weights and metrics as a run never killed
    (CPU, trainer.deterministic=true; the random generators' state travels in the checkpoint)."""
    args = ["trainer.deterministic=true", "trainer.max_epochs=2", "trainer.limit_train_batches=40",
            "data.batch_size=8", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "data.num_workers=0",
            "augment.mixup_alpha=0.2", *FAST]  # shuffling, augmentation and mixing all draw random numbers
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(compose_train(args, whole))
    proc = subprocess.Popen([sys.executable, "-m", "lightning_project.train", f"hydra.run.dir={killed}", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0  # killed during epoch 1
    assert not (killed / "metrics.json").exists()
    train(compose_train([*args, "resume=auto"], killed))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, killed))
    assert a["history"] == b["history"] and a["metrics"] == b["metrics"]
    weights = [torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
               for d in (whole, killed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
