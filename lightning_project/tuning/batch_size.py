"""The largest training batch that fits on the device: Lightning's batch-size finder, bounded.

Lightning's `Tuner.scale_batch_size` runs a few real training steps at growing batch sizes until
CUDA reports out-of-memory. It finds the size through `lightning_getattr(module, "batch_size")`,
which looks in the module, its hparams and the data module's hparams: ours sits in
`ImageDataModule.hparams.batch_size`, which is also what its loaders read, so each trial's loader
really has the tried size. The data module's value is restored afterwards.

A CPU never raises out-of-memory (the process is killed instead), so there the search is only as
good as its bound (`max_trials`), and the report says so; Lightning also stops once one batch
holds the whole training set.
"""

from __future__ import annotations

import copy

import pytorch_lightning as pl
from pytorch_lightning.tuner import Tuner

from lightning_project.data import ImageDataModule
from lightning_project.models import ClassifierModule
from lightning_project.tuning.options import BatchSize
from lightning_project.tuning.report import CheckResult

MAX_VAL = 8192  # Lightning's own ceiling on tried sizes


def describe_device(trainer: pl.Trainer) -> str:
    import torch

    device = trainer.strategy.root_device
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def check(
    trainer: pl.Trainer, module: ClassifierModule, datamodule: ImageDataModule, options: BatchSize
) -> CheckResult:
    """Run Lightning's finder with a throwaway `trainer` (no loggers, no checkpoints) on a copy of `module`.

    The copy trains at constant lr: the finder caps the trainer's steps per trial, which a
    OneCycle/cosine schedule planned for the whole run would take for a resumed run of another
    length (and refuse), and a schedule does not change memory use."""
    module = copy.deepcopy(module).train_widest()  # gradual: memory of the fully unfrozen phase
    module.hparams.scheduler = {"name": "none"}
    device = trainer.strategy.root_device
    trials = options.trials(device.type)
    configured = datamodule.hparams.batch_size
    try:
        found = Tuner(trainer).scale_batch_size(
            module, datamodule=datamodule, mode=options.mode, init_val=options.init_val, max_trials=trials,
            steps_per_trial=options.steps_per_trial, margin=options.margin, batch_arg_name="batch_size",
            max_val=MAX_VAL,
        )
    finally:
        datamodule.hparams.batch_size = configured
    train_size = len(datamodule.train_dataloader().dataset)
    bound = min(options.init_val * 2 ** (trials - 1), MAX_VAL)
    where = describe_device(trainer)
    details = {"batch_size": found, "device": where, "configured": configured, "mode": options.mode,
               "init_val": options.init_val, "max_trials": trials, "search_bound": bound, "train_images": train_size}
    expect = f"memory-bound on {where} (configured data.batch_size={configured})"
    if found is None:
        message = "the finder did not run (trainer.fast_dev_run?)"
        return CheckResult("batch_size", "fail", None, expect, message, details)
    details["memory_bound"] = False
    if found >= train_size:
        message = (f"{found}: one batch already holds the whole training set ({train_size} images); the data, "
                   "not memory, is the limit")
        return CheckResult("batch_size", "warn", found, expect, message, details)
    if found >= bound * (1 - options.margin) - 1:
        why = ("a CPU gives no out-of-memory signal, so RAM is the only limit" if device.type == "cpu"
               else "raise tune.batch_size.max_trials to search further")
        message = f"{found} fits: that is the search bound ({bound}), not a memory limit; {why}"
        return CheckResult("batch_size", "warn", found, expect, message, details)
    details["memory_bound"] = True
    return CheckResult("batch_size", "ok", found, expect,
                       f"{found} is the largest {options.mode} size that fits on {where} (configured {configured})",
                       details)
