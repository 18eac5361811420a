"""The fast path, checked where it can be on a CPU: what each training step reads back from the device."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import FAST, compose_train, run_module

from lightning_project.models import ClassifierModule
from lightning_project.train import train


def test_training_steps_read_back_from_the_device_only_at_logging_steps(tmp_path):
    """On a GPU every read of a tensor's value (the progress bar's loss, a NaN check, torchmetrics' input
    checks) waits for the queued work. With the default callbacks, loggers and progress bar, the steps
    between logging steps (trainer.log_every_n_steps=10, the bar's refresh_rate=10) read nothing."""
    probe = tmp_path / "probe"
    cfg = compose_train([
        "trainer.limit_train_batches=30", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0", "data.batch_size=8",
        "data.num_workers=1",  # the augmentations' random draws (CPU tensors) happen in the worker, not counted
        "model.pretrained=false", "augment.image_size=32", "trainer.enable_progress_bar=true",
        "+callbacks.readback._target_=probes.ReadBackCounter", f"+callbacks.readback.out={probe}",
    ], tmp_path / "run")
    train(cfg)
    reads = {int(k): v for k, v in json.loads((probe / "readbacks.json").read_text()).items()}
    assert set(reads) <= {9, 19, 29}, reads  # batch indices 9, 19, 29: the 10th, 20th and 30th steps
    assert reads.get(9), "the logging step read nothing: the counter is not counting"
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:  # the step loss still reaches the loggers
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_step")]
    assert [int(r["step"]) for r in rows] == [9, 19, 29] and all(float(r["train/loss_step"]) > 0 for r in rows)


TINY = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "trainer.max_epochs=1", "data.batch_size=8", "data.num_workers=0", *FAST]


@pytest.mark.slow
def test_compiled_channels_last_run_saves_plain_checkpoints(tmp_path, capsys):
    """compile=true and channels_last=true train, and the checkpoint is an ordinary one: parameter names
    without torch.compile's `_orig_mod.`, loadable by an uncompiled module and by evaluate. (aot_eager:
    dynamo's graph capture and AOT autograd without inductor's C++ build, minutes on two cores.)"""
    run = tmp_path / "run"
    train(compose_train([*TINY, "compile=true", "compile_options.backend=aot_eager", "channels_last=true"], run))
    report = json.loads((run / "metrics.json").read_text())
    assert report["speed"] | {"cudnn_benchmark": None} == {
        "precision": "32-true", "channels_last": True, "compile": True, "cudnn_benchmark": None,
        "deterministic": False, "matmul_precision": "high"}
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k] and "net.conv1.weight" in state
    assert state["net.conv1.weight"].is_contiguous(memory_format=torch.channels_last)  # trained in NHWC
    module = ClassifierModule.load_from_checkpoint(ckpt).eval()  # strict loading: every name matches
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert module(x).shape == (2, 10) and not module.channels_last
    status, out, err = run_module(capsys, "evaluate", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}",
                                  "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false")
    assert status == 0, err[-2000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["test/acc"] >= 0


def test_channels_last_auto_is_off_on_the_cpu(tmp_path):
    run = tmp_path / "run"
    train(compose_train(TINY, run))
    speed = json.loads((run / "metrics.json").read_text())["speed"]
    assert speed["channels_last"] is False and speed["compile"] is False


def test_train_metrics_logged_once_an_epoch_count_every_batch_of_that_epoch(tmp_path):
    """The metric objects are handed to Lightning at the epoch's first step only (each self.log costs every
    step); train/acc must still be over all of the epoch's batches, and over nothing of the epoch before."""
    probe, run = tmp_path / "probe", tmp_path / "run"
    train(compose_train([*TINY, "trainer.limit_train_batches=4", "trainer.max_epochs=3", "optim.lr=0.05",
                         "+callbacks.inputs._target_=probes.MetricInputs", f"+callbacks.inputs.out={probe}"], run))
    expected = json.loads((probe / "train_acc.json").read_text())
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [e["train/acc"] for e in history] == pytest.approx([expected[str(i)] for i in range(3)], abs=1e-6)
    assert len(set(expected.values())) > 1  # the epochs differ: a value carried over would show
