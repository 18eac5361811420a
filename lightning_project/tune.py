"""`python -m lightning_project.tune`: the checks a careful practitioner runs before a long run.

Composes exactly like `train` (every train override works), builds the same data module, module,
parameter groups and transforms with train.py's own builders, then runs the checks named in
`tune.checks` and writes `tune_report.json`, `overfit_batch.png` and `lr_finder.png` in the run
directory. The checks themselves live in `lightning_project/tuning/` (plain Python).
"""

from __future__ import annotations

import copy
import logging
import time

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from lightning_fabric import Fabric
from omegaconf import DictConfig, open_dict

from lightning_project.callbacks import EpochHistory
from lightning_project.errors import UserError
from lightning_project.models.backbones import normalization
from lightning_project.train import (
    build_datamodule,
    build_module,
    build_trainer,
    fit_metrics,
    print_groups,
    run_dir,
    trainer_error,
)
from lightning_project.tuning import TuneOptions, batch_size, checks, lr_finder
from lightning_project.tuning.report import (
    CheckResult,
    overall_status,
    print_report,
    suggestions,
    train_command,
)
from lightning_project.utils import config as config_utils
from lightning_project.utils import runtime, schema, summary
from lightning_project.utils.config import plain

log = logging.getLogger("lightning_project")


def _one_device(devices):
    """The checks measure one device (the batch size is per device): the first of a list, else 1."""
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return [list(devices)[0]]
    return 1


def build_fabric(cfg: DictConfig) -> Fabric:
    """Lightning Fabric on the run's accelerator and precision: our own loops then train on the
    device, with the autocast and gradient scaling, that the real run will use."""
    t = cfg.trainer
    try:
        return Fabric(accelerator=t.accelerator, devices=_one_device(t.devices), precision=t.precision)
    except Exception as e:
        raise trainer_error(t, e) from None


def build_probe_trainer(cfg: DictConfig) -> pl.Trainer:
    """A throwaway Trainer for the batch-size finder: the run's trainer settings on one device,
    without loggers, checkpoints, callbacks or sanity checks."""
    probe = copy.deepcopy(cfg)
    with open_dict(probe):
        probe.callbacks = None
        probe.logger = None
        probe.trainer.devices = _one_device(probe.trainer.devices)
        probe.trainer.pop("strategy", None)  # one device: Lightning refuses the finder under DDP
        probe.trainer.enable_checkpointing = False
        probe.trainer.enable_model_summary = False
        probe.trainer.enable_progress_bar = False
        probe.trainer.num_sanity_val_steps = 0
    return build_trainer(probe, EpochHistory())


def _seed(seed: int | None) -> None:
    """Each check starts from the same random state: its numbers do not depend on which ran before."""
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)


def tune(cfg: DictConfig) -> dict:
    options = TuneOptions.from_dict(plain(cfg.get("tune")))  # before any heavy work
    schema.check(cfg, fit_metrics(cfg, cfg.data.get("num_classes")))
    if cfg.get("ckpt_path"):
        raise UserError("ckpt_path: tune checks the start of a run; to start from a checkpoint's weights use "
                        "model.weights_path=<checkpoint> instead")
    started = time.perf_counter()
    out = run_dir()
    console = runtime.console()
    runtime.setup(cfg.seed, cfg.matmul_precision)
    config_utils.print_tree(cfg, console)
    config_utils.save(cfg, out / ".hydra" / "config.yaml")

    mean, std = normalization(cfg.model.name, cfg.model.weights)
    datamodule = build_datamodule(cfg, mean, std)
    module = build_module(cfg, datamodule, mean, std)
    print_groups(module, console)
    fabric = build_fabric(cfg)
    probe = build_probe_trainer(cfg) if "batch_size" in options.checks else None
    datamodule.setup("fit")
    base_lr = float(cfg.optim.lr)
    seed = cfg.seed if cfg.seed is not None else 0

    def run(name: str) -> CheckResult:
        if name == "initial_loss":
            return checks.initial_loss(fabric, module, datamodule.train_dataloader(), options.initial_loss)
        if name == "overfit_batch":
            batch = checks.fixed_batch(datamodule.train_dataloader().dataset, options.overfit_batch.batch_size, seed)
            plot = out / "overfit_batch.png"
            return checks.overfit_batch(fabric, module, batch, base_lr, options.overfit_batch, plot)
        if name == "lr_finder":
            loader = datamodule.train_dataloader()
            return lr_finder.check(fabric, module, loader, base_lr, options.lr_finder, out / "lr_finder.png")
        return batch_size.check(probe, module, datamodule, options.batch_size)

    results = []
    for name in options.checks:
        _seed(cfg.seed)
        check_start = time.perf_counter()
        result = run(name)
        result.seconds = round(time.perf_counter() - check_start, 3)
        log.info("%s: %s (%s)", name, result.status, result.message)
        results.append(result)

    suggested = suggestions(results)
    command = train_command(list(HydraConfig.get().overrides.task), suggested) if suggested else None
    report = {
        "status": overall_status(results),
        "checks": {r.name: r.as_dict() for r in results},
        "device": str(fabric.device),
        "precision": str(cfg.trainer.precision),
        "model": cfg.model.name,
        "pretrained": {"requested": str(cfg.model.pretrained), "used": module.weights_source.used},
        "num_classes": len(datamodule.classes),
        "batch_size": datamodule.hparams.batch_size,
        "optim_lr": base_lr,
        "param_groups": module.group_table(),
        "suggested": suggested,
        "train_command": command,
        "seconds": round(time.perf_counter() - started, 3),
    }
    summary.write_json(out / "tune_report.json", report)
    print_report(results, console, f"tune: {cfg.model.name} on {report['device']} ({out / 'tune_report.json'})")
    if options.apply and command:
        if "data.batch_size" in suggested and "optim.lr" in suggested:
            console.print(f"note: the lr was measured at data.batch_size={report['batch_size']}; re-run tune with "
                          f"data.batch_size={suggested['data.batch_size']} tune.checks=[lr_finder] to measure it there")
        console.print("to train with the suggested values:", soft_wrap=True)
        console.print(command, soft_wrap=True, markup=False, highlight=False)
    elif options.apply:
        console.print("nothing to apply: neither check produced a value (see the table)")
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
def main(cfg: DictConfig) -> dict:
    with runtime.user_errors():
        return tune(cfg)


if __name__ == "__main__":
    main()
