"""`python -m lightning_project.train`: fit, test with the best checkpoint, fill the run directory.

The only place (with the other entry points) that knows Hydra: the config is turned into plain
values here and handed to the data module, the LightningModule and the Trainer.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
from pytorch_lightning.callbacks import LearningRateMonitor, ProgressBar
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.table import Table

from lightning_project.callbacks import AtomicCheckpointIO, EpochHistory, RandomStateInCheckpoint
from lightning_project.callbacks.collapse import SHARE_METRIC
from lightning_project.data import ImageDataModule, create_datamodule, sampling
from lightning_project.data.feature_cache import FeatureCache
from lightning_project.errors import Stopped, UserError
from lightning_project.models import ClassifierModule, check_resumable
from lightning_project.models.backbones import normalization
from lightning_project.models.classifier import metric_names
from lightning_project.models.finetune import check_milestones
from lightning_project.models.layers import make_pooling_deterministic
from lightning_project.utils import config as config_utils
from lightning_project.sweeping import run_trial
from lightning_project.sweeping.ddp import SweepJobLauncher, shorten_timeout
from lightning_project.sweeping.trials import in_multirun
from lightning_project.utils import provenance, runtime, schema, summary, tracking
from lightning_project.utils.config import plain

log = logging.getLogger("lightning_project")


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def fit_metrics(cfg: DictConfig, num_classes: int | None) -> list[str]:
    """The metrics logged while fitting: what optimized_metric and the monitors may name."""
    names = [n for n in metric_names(num_classes) if not n.startswith("test/")]
    detector = (cfg.get("callbacks") or {}).get("collapse_detector")
    return names + [SHARE_METRIC] if detector is not None and detector.get("log_share", True) else names


def build_datamodule(cfg: DictConfig, mean: list[float], std: list[float]) -> ImageDataModule:
    """The configured data module, with its labels read and checked (no images decoded yet)."""
    kwargs = plain(cfg.data)
    target = kwargs.pop("_target_", None)
    if not target:
        raise UserError("data._target_ is missing: pick a data config (data=digits|imagefolder|csv|cifar10)")
    # built directly, not through hydra's instantiate, which would try to build the transform specs
    return create_datamodule(
        target,
        **{**kwargs, "image_size": cfg.augment.image_size},  # the network input, what both pipelines produce
        train_transforms=plain(cfg.augment.train),
        eval_transforms=plain(cfg.augment.eval),
        mean=mean,
        std=std,
        mixup_alpha=cfg.augment.get("mixup_alpha", 0.0),
        cutmix_alpha=cfg.augment.get("cutmix_alpha", 0.0),
        mix_prob=cfg.augment.get("mix_prob", 1.0),
    )


def loss_weights(cfg: DictConfig, datamodule: ImageDataModule) -> list[float] | None:
    """loss.class_weights: null | auto (= balanced) | balanced | sqrt | a list, from the training counts."""
    setting = plain(cfg.loss.get("class_weights"))
    counts = list(datamodule.class_counts["train"].values())
    if setting is None:
        if max(counts) >= 5 * min(counts) and not cfg.data.get("sampler"):
            log.warning("classes are imbalanced (training images per class from %d to %d): consider "
                        "data.sampler=balanced or loss.class_weights=auto", min(counts), max(counts))
        return None
    if cfg.data.get("sampler"):
        log.warning("data.sampler=%s and loss.class_weights=%s both correct the imbalance: the rare classes "
                    "count twice over; usually one of them is enough", cfg.data.sampler, setting)
    return sampling.class_weights(counts, setting)


def build_module(cfg: DictConfig, datamodule: ImageDataModule, mean, std, resuming: bool = False) -> ClassifierModule:
    resuming = resuming or cfg.get("ckpt_path") is not None
    module = ClassifierModule(
        model_name=cfg.model.name,
        num_classes=len(datamodule.classes),
        class_names=datamodule.classes,
        pretrained=False if resuming else cfg.model.pretrained,  # a resumed run takes its weights from the checkpoint
        weights=cfg.model.weights,
        weights_path=None if resuming else cfg.model.weights_path,
        download=cfg.model.download,
        head_dropout=cfg.model.head_dropout,
        finetune=plain(cfg.finetune),
        optim=plain(cfg.optim),
        scheduler=plain(cfg.scheduler),
        label_smoothing=cfg.loss.label_smoothing,
        class_weights=loss_weights(cfg, datamodule),
        image_size=cfg.augment.image_size,
        mean=mean,
        std=std,
    )
    if cfg.trainer.get("deterministic"):
        make_pooling_deterministic(module.net)
    return module


def apply_speed(cfg: DictConfig, module: ClassifierModule, trainer: pl.Trainer) -> dict:
    """channels_last and torch.compile as configured; returns the speed settings in force (metrics.json)."""
    on_gpu = isinstance(trainer.accelerator, CUDAAccelerator)
    setting = cfg.get("channels_last", "auto")
    convolutional = any(isinstance(m, torch.nn.Conv2d) for m in module.net.modules())
    channels_last = on_gpu and convolutional if setting == "auto" else bool(setting)
    if channels_last:
        module.use_channels_last()
    if cfg.get("compile"):
        options = {k: v for k, v in plain(cfg.get("compile_options") or {}).items() if v is not None}
        try:
            module.compile_network(**options)
        except Exception as e:  # torch.compile checks the backend and mode when it is called
            raise UserError(f"compile_options {options}: torch.compile refuses them ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]}); fix compile_options.* (backend: inductor, aot_eager, eager)"
                            ) from None
    precision = str(cfg.trainer.get("precision"))
    if on_gpu and precision in ("32", "32-true") and rank_zero_only.rank == 0:
        log.warning("training in float32 on %s: trainer=gpu (bf16-mixed, channels_last, cudnn.benchmark) is usually "
                    "about twice as fast", torch.cuda.get_device_name())
    return {"precision": precision, "channels_last": channels_last, "compile": bool(cfg.get("compile")),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "deterministic": bool(cfg.trainer.get("deterministic")),
            "matmul_precision": cfg.matmul_precision}


def resume_from(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint to continue from: `ckpt_path`, or with resume=auto this run directory's last.ckpt.
    Without either, a run directory that already holds a run is refused rather than overwritten."""
    mode = cfg.get("resume")  # null | auto (utils/schema.py checked it)
    last = out / "checkpoints" / "last.ckpt"
    if cfg.get("ckpt_path"):
        return cfg.ckpt_path
    # Lightning's SLURM requeue saves hpc_ckpt_<n>.ckpt in the run directory on its signal: take the newest
    found = [p for p in (last, *out.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    if mode == "auto":
        if found:
            newest = max(found, key=lambda p: p.stat().st_mtime)
            log.info("resume=auto: continuing from %s", newest)
            return str(newest)
        log.info("resume=auto: no %s yet, starting afresh", last)
        return None
    if rank_zero_only.rank == 0 and (found or (out / "metrics.json").is_file()):
        raise UserError(f"hydra.run.dir={out} already holds a run; rerun with resume=auto to continue it, or choose "
                        "another hydra.run.dir (the default is a new time-stamped folder)")
    return None


def print_groups(module: ClassifierModule, console: Console) -> None:
    table = Table(title=f"parameter groups ({type(module.net).__name__}, head: {module.head})")
    for column in ("group", "patterns", "tensors", "trainable", "frozen", "lr", "weight decay"):
        table.add_column(column, justify="left" if column in ("group", "patterns") else "right")
    for row in module.group_table():
        table.add_row(
            row["group"], row["patterns"], row["tensors"], f"{row['trainable']:,}", f"{row['frozen']:,}",
            f"{row['lr']:.3g}", f"{row['weight_decay']:.3g}",
        )
    console.print(table)
    console.print(f"frozen parameters: {module.frozen_parameter_count():,}")


def _instantiate_all(section: DictConfig | None, what: str) -> list:
    """Every `_target_` entry of a callbacks/logger mapping (entries set to null are skipped)."""
    out = []
    for name, node in (section or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise UserError(f"{what}.{name}: needs a _target_ (the class to create)")
        try:
            out.append(instantiate(node, _convert_="all"))
        except InstantiationException as e:  # the class's own complaint, on one line, with the key
            cause = str(e.__cause__ or e).strip().splitlines()[-1]
            if isinstance(e.__cause__, ModuleNotFoundError):  # Lightning's hint names a heavier package
                raise UserError(f"{what}.{name} needs a package that is not installed ({cause.split('. HINT')[0]}): "
                                "pip install -e '.[tracking]'") from None
            raise UserError(f"{what}.{name} ({node['_target_']}): {cause}; fix {what}.{name}.*") from None
    return out


def build_trainer(cfg: DictConfig, history: EpochHistory) -> pl.Trainer:
    # the random state travels in checkpoints: a resumed run continues the same random streams
    callbacks = _instantiate_all(cfg.get("callbacks"), "callbacks") + [history, RandomStateInCheckpoint()]
    loggers = _instantiate_all(cfg.get("logger"), "logger")
    if not loggers:  # nothing to log learning rates to (Lightning would refuse to start)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    try:  # checkpoints are written atomically (callbacks/crash_safety.py says why Lightning's own is not enough)
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                              plugins=[AtomicCheckpointIO()], _convert_="all")
    except Exception as e:  # Lightning's own checks of accelerator, devices, precision, ...
        raise trainer_error(cfg.trainer, e) from None
    if cfg.trainer.get("sync_batchnorm") and trainer.world_size > 1 and isinstance(trainer.accelerator, CPUAccelerator):
        raise UserError("trainer.sync_batchnorm=true: PyTorch's SyncBatchNorm runs on GPUs only and this DDP run is on "
                        "the CPU; set trainer.sync_batchnorm=false (each process then normalises its own batch)")
    # Lightning quietly trains in bf16 instead: the run would not be the one asked for
    if str(cfg.trainer.get("precision")) in ("16", "16-mixed") and isinstance(trainer.accelerator, CPUAccelerator):
        raise UserError(f"trainer.precision={cfg.trainer.precision}: float16 mixed precision needs a GPU and this run "
                        "is on the CPU; use trainer.precision=bf16-mixed or 32-true (or trainer=gpu on a GPU machine)")
    return trainer


def trainer_error(t: DictConfig, e: Exception) -> UserError:
    """Lightning's complaint about the device settings (Trainer or Fabric) as our one line."""
    cause = str(e.__cause__ or e).strip().splitlines()[0]
    return UserError(
        f"trainer (accelerator={t.get('accelerator')}, devices={t.get('devices')}, "
        f"precision={t.get('precision')}): {cause}; fix trainer.* (trainer=cpu runs anywhere)"
    )


def _last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest checkpoint written (callbacks.last_checkpoint, or a save_last=true callback)."""
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor is None and callback.best_model_path:
            return callback.best_model_path
        if callback.save_last and callback.last_model_path:
            return callback.last_model_path
    return None


def _optimized_value(cfg: DictConfig, trainer: pl.Trainer, metrics: dict) -> float | None:
    name = cfg.optimized_metric
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.monitor == name and ckpt.best_model_score is not None:
        return float(ckpt.best_model_score)
    return metrics.get(name)


def train(cfg: DictConfig, progress: dict | None = None) -> float | None:
    """Fit and test as configured; `progress` (a dict) receives the trainer, so a failure can say where."""
    started = time.perf_counter()
    schema.check(cfg, fit_metrics(cfg, cfg.data.get("num_classes")))  # before anything is read or built
    out = run_dir()
    console = runtime.console()
    runtime.setup(cfg.seed, cfg.matmul_precision)
    # Under DDP Lightning reruns this command once per extra process (same run directory): only
    # rank 0 prints and writes; every rank builds the same data, model and trainer.
    main_process = rank_zero_only.rank == 0
    if main_process:
        config_utils.print_tree(cfg, console)
        config_utils.save(cfg, out / ".hydra" / "config.yaml")
        overrides = list(HydraConfig.get().overrides.task)
        summary.write_json(out / "environment.json", provenance.describe("lightning_project.train", overrides))

    ckpt_path = resume_from(cfg, out)
    if cfg.finetune.get("strategy") == "gradual" and not cfg.trainer.get("fast_dev_run"):  # before any work
        check_milestones(list(cfg.finetune.get("milestones") or []), cfg.trainer.get("max_epochs"))
    history = EpochHistory()
    trainer = build_trainer(cfg, history)  # Lightning checks the device settings: before the data is read
    if progress is not None:
        progress["trainer"] = trainer
    if in_multirun() and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        # Lightning would start the other DDP processes by rerunning the whole sweep: run this job only
        launcher = SweepJobLauncher(trainer.strategy.launcher, "lightning_project.train")
        trainer.strategy._launcher = launcher
        shorten_timeout(trainer.strategy)
        if progress is not None:
            progress["finish"].append(launcher.finish)
    mean, std = normalization(cfg.model.name, cfg.model.weights)
    datamodule = build_datamodule(cfg, mean, std)
    log.info("data: %d classes, %s images", len(datamodule.classes), datamodule.counts)
    schema.check_metrics(cfg, fit_metrics(cfg, len(datamodule.classes)))  # val/top5 needs 5 classes
    if main_process:
        summary.write_json(out / "classes.json", datamodule.class_info())
    module = build_module(cfg, datamodule, mean, std, resuming=ckpt_path is not None)
    if ckpt_path:
        check_resumable(ckpt_path, module, datamodule.class_counts)
    if main_process:
        print_groups(module, console)
    speed = apply_speed(cfg, module, trainer)

    # frozen backbone + deterministic transforms: the head trains on features computed once (in fit_seconds)
    cache = FeatureCache.plan(module, datamodule, cfg.finetune.get("feature_cache", "auto"),
                             Path(cfg.finetune.get("feature_cache_dir") or out / "feature_cache"))
    tracking.log_config(trainer.loggers, plain(cfg))  # the whole resolved config, comparable across runs
    fit_start = time.perf_counter()
    memory = functools.partial(  # one line with the fix instead of a CUDA traceback
        runtime.out_of_memory,
        f"data.batch_size={datamodule.hparams.batch_size} on {type(trainer.accelerator).__name__[:-11]} "
        f"({cfg.model.name}, {cfg.augment.image_size} px, precision {cfg.trainer.precision})",
        "lower data.batch_size (raise trainer.accumulate_grad_batches to keep the effective batch), or find the "
        "largest that fits with `python -m lightning_project.tune tune.checks=[batch_size]` and the same overrides")
    try:
        with memory(), cache.serving(module, datamodule):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # a SystemExit with status 0 otherwise: a preempted run must not look finished
        raise Stopped(f"stopped by SIGTERM at epoch {trainer.current_epoch}, step {trainer.global_step}; rerun the "
                        f"same command with resume=auto (hydra.run.dir={out}) to continue") from None
    fit_seconds = time.perf_counter() - fit_start

    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    test_start = time.perf_counter()
    with memory():
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best) if cfg.get("test", True) else [{}]
    test_seconds = time.perf_counter() - test_start

    epochs = history.epochs
    metrics = {k: float(v) for k, v in (epochs[-1] if epochs else {}).items() if k != "epoch"}
    metrics.update({k: float(v) for k, v in results[0].items()})
    value = _optimized_value(cfg, trainer, metrics)
    report = {
        "optimized_metric": {"name": cfg.optimized_metric, "mode": cfg.optimized_mode, "value": value},
        "metrics": metrics,
        "best_checkpoint": best,
        "best_score": float(ckpt.best_model_score) if ckpt is not None and ckpt.best_model_score is not None else None,
        "last_checkpoint": _last_checkpoint(trainer),
        "pretrained": {
            "requested": str(cfg.model.pretrained),
            "used": module.weights_source.used,
            "source": module.weights_source.source,
        },
        "model": cfg.model.name,
        "param_groups": module.group_table(),
        "frozen_parameters": module.frozen_parameter_count(),
        "feature_cache": cache.report(),
        "speed": speed,
        "lr_scaling": module.applied_lr_scaling,
        "classes": datamodule.classes,
        "split_sizes": datamodule.counts,
        "per_class": summary.per_class(module.confusion, datamodule.classes) if module.confusion is not None else None,
        "skipped_files": getattr(datamodule, "bad_files", {}),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "timings": {
            "fit_seconds": round(fit_seconds, 3),
            "test_seconds": round(test_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
        },
        "history": epochs,
    }
    if not trainer.is_global_zero:
        return value
    summary.write_json(out / "metrics.json", report)
    if epochs:
        summary.plot_curves(epochs, out / "curves.png")
    if module.confusion is not None:
        summary.plot_confusion(module.confusion, datamodule.classes, out / "confusion_matrix.png")
    log.info("%s = %s; run directory: %s", cfg.optimized_metric, value, out)
    return value


CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with runtime.user_errors():  # in a sweep, a failed run is recorded and the sweep goes on
        return run_trial(train, cfg, run_dir())


if __name__ == "__main__":
    # Hydra runs the importable module's main, not this __main__ copy: launchers that pickle the task (joblib,
    # submitit) then send a reference to lightning_project.train.main instead of this file's code and globals by value
    from lightning_project.train import main as importable_main

    importable_main()
