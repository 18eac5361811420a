"""The LightningModule: a torchvision network with a new head, a fine-tuning plan and its optimizer.

Plain Python: build it in a notebook with keyword arguments, or reload it from a checkpoint with
`ClassifierModule.load_from_checkpoint(path)` (no Hydra, no network: the checkpoint holds the
weights, the class names, the input size and the normalisation).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from lightning_project.errors import UserError
from lightning_project.models import backbones, finetune
from lightning_project.optim import build_optimizer, build_scheduler
from lightning_project.optim.schedulers import WARMUP_SHAPES, WarmupSchedule

log = logging.getLogger("lightning_project")
CHECKPOINT_KEY = "lightning_project"  # our extra entry in Lightning checkpoints


def _metrics(num_classes: int, prefix: str) -> MetricCollection:
    # validate_args=False: torchmetrics' input checks (torch.unique over the targets, every update) read
    # values back from the GPU at every step; our data modules only ever yield class indices in range
    common = {"num_classes": num_classes, "validate_args": False}
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(**common, average="micro"),
        "f1": MulticlassF1Score(**common, average="macro"),
        "precision": MulticlassPrecision(**common, average="macro"),
        "recall": MulticlassRecall(**common, average="macro"),
    }
    if num_classes >= 5:
        metrics["top5"] = MulticlassAccuracy(**common, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


class BatchMean(Metric):
    """The mean of per-batch values weighted by batch size, summed over processes at compute: what
    Lightning's own on_epoch averaging gives. (torchmetrics' MeanMetric either checks every value for NaN,
    a read-back from the GPU, or with nan_strategy="disable" drops the weights; its weight also travels
    as a tensor copied to the device every step. A Python int added in place is a kernel argument.)"""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")  # float32: MPS has no float64
        self.add_state("count", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, n: int) -> None:
        self.total += value.detach().float() * n
        self.count += n

    def compute(self) -> torch.Tensor:
        return self.total / self.count


def metric_names(num_classes: int | None) -> list[str]:
    """Every metric name the module logs (`train/acc`, `val/f1`, ...); top5 needs 5 classes (None: unknown yet)."""
    kinds = ["loss", "acc", "f1", "precision", "recall"] + (["top5"] if num_classes is None or num_classes >= 5 else [])
    return [f"{split}/{kind}" for split in ("train", "val", "test") for kind in kinds] + ["train/loss_step"]


class ClassifierModule(pl.LightningModule):
    """Fine-tunes torchvision model `model_name` for `num_classes` classes.

    finetune: {strategy: full|feature_extractor|partial|gradual, train_stages, milestones, lr_decay, freeze,
               unfreeze, freeze_bn_stats, feature_cache}
    optim: {_target_ (torch.optim class), lr, groups: [{name, patterns, lr|lr_scale, ...}], rest,
            no_decay_norm_bias, **options}
    scheduler: {name, **options} (see lightning_project.optim.schedulers)
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        class_names: list[str] | None = None,
        pretrained: bool | str = False,
        weights: str = "DEFAULT",
        weights_path: str | None = None,
        download: bool = True,
        head_dropout: float = 0.0,
        finetune: dict | None = None,
        optim: dict | None = None,
        scheduler: dict | None = None,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        image_size: int = 224,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"loss.label_smoothing={label_smoothing}: must be in [0, 1)")
        class_names = list(class_names or [str(i) for i in range(num_classes)])
        if mean is None or std is None:
            mean, std = backbones.normalization(model_name, weights)
        # reads the (completed) arguments above, which rebuild this module; the loggers get the whole config
        self.save_hyperparameters(logger=False)  # from train.py instead
        self.net, self.head = backbones.build_network(model_name, num_classes, head_dropout)
        self.groups = self._plan(finetune or {}, dict(optim or {}))  # validated before any download
        self._check_recipe()
        self.weights_source = backbones.load_pretrained(
            self.net, self.head, model_name, pretrained, weights, weights_path, download
        )
        if class_weights is not None and len(class_weights) != num_classes:
            raise UserError(f"loss.class_weights: {len(class_weights)} weights for {num_classes} classes")
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        # class weights shape the training loss only: val/test losses stay plain cross-entropy, so
        # runs with and without weights (or with other weights) compare on the same val/loss
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        if weight is not None:  # rebuilt from the hyperparameters: kept out of the weights a checkpoint shares
            self.criterion.register_buffer("weight", weight, persistent=False)
        self.eval_criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_metrics = _metrics(num_classes, "train/")
        self.train_loss = BatchMean()  # train/loss: the epoch's mean over all processes
        self.val_metrics = _metrics(num_classes, "val/")
        self.test_metrics = _metrics(num_classes, "test/")
        self.test_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)
        self.confusion: torch.Tensor | None = None  # filled at the end of `test`
        # True while batches hold cached backbone features instead of images (frozen backbone):
        # only the head runs. Set by the feature cache around `fit`, never saved.
        self.feature_input = False
        self.channels_last = False  # NHWC weights and image batches (use_channels_last), never saved
        self.applied_lr_scaling: dict | None = None  # optim.scale_lr as applied by configure_optimizers
        self._train_metrics_logged = False  # this epoch's train/acc, train/f1, ... handed to Lightning yet

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, weights_only=True, **kwargs):
        """Reload for inference or further training: the weights come from the checkpoint, so the
        pretrained ones are never fetched again (override any hyperparameter with a keyword).
        Our checkpoints hold tensors and plain values only, so they load with weights_only=True."""
        kwargs.setdefault("pretrained", False)
        kwargs.setdefault("weights_path", None)
        return super().load_from_checkpoint(
            checkpoint_path, map_location=map_location, weights_only=weights_only, **kwargs
        )

    # ---- fine-tuning plan -------------------------------------------------------------------
    def _plan(self, ft: dict, optim: dict) -> list[finetune.ParamGroup]:
        """Parameter groups, and which parameters train at which epoch (`trainable_at`)."""
        alias = finetune.aliases(self.net, self.head)
        strategy = ft.get("strategy", "full")
        initial = finetune.plan_trainable(
            self.net,
            self.head,
            strategy=strategy,
            train_stages=int(ft.get("train_stages", 1)),
            freeze=ft.get("freeze") or (),
            unfreeze=ft.get("unfreeze") or (),
            alias=alias,
        )
        base_lr = float(optim.get("lr", 1e-3))
        groups, ungrouped = finetune.plan_groups(
            self.net, optim.get("groups") or [], base_lr, optim.get("rest", "default"), alias
        )
        names = [n for n, _ in self.net.named_parameters()]
        never = set(ungrouped) | set(finetune.select(names, ft.get("freeze") or (), "finetune.freeze", alias))
        self.initial_trainable = initial - set(ungrouped)
        self.unfreeze_plan: list[tuple[int, list[str], list[str]]] = []  # (epoch, blocks, parameter names)
        if strategy == "gradual":
            for epoch, blocks, paths in finetune.unfreeze_schedule(self.net, self.head, ft.get("milestones") or []):
                members = [n for n in finetune.select(names, paths, "finetune.milestones") if n not in never]
                self.unfreeze_plan.append((epoch, blocks, members))
        elif ft.get("milestones"):
            raise UserError(f"finetune.milestones: only finetune.strategy=gradual uses them (strategy={strategy})")
        if ft.get("lr_decay") is not None:
            groups = finetune.split_by_stage(groups, self.net, self.head, float(ft["lr_decay"]))
        if optim.get("no_decay_norm_bias", True):
            groups = finetune.split_no_decay(groups, self.net, float(optim.get("weight_decay", 0.0)))
        if not self.trainable_at(10**9):
            raise UserError("finetune/optim: no parameter is left trainable; check finetune.* and optim.rest")
        self.set_trainable(0)
        return groups

    def trainable_at(self, epoch: int) -> set[str]:
        """Names of the parameters that train during `epoch` (gradual unfreezing adds blocks)."""
        out = set(self.initial_trainable)
        for milestone, _, members in self.unfreeze_plan:
            if epoch >= milestone:
                out.update(members)
        return out

    def train_widest(self) -> ClassifierModule:
        """Train from the start everything the plan will ever train (tune's copies measure the
        memory and the lr of a gradual run's fully unfrozen phase)."""
        self.initial_trainable, self.unfreeze_plan = self.trainable_at(10**9), []
        self.set_trainable(0)
        return self

    def set_trainable(self, epoch: int) -> list[str]:
        """Flip requires_grad for `epoch` (a function of the epoch only, so a resumed run gets the
        same frozen set); returns the blocks unfrozen by a milestone at exactly this epoch."""
        trainable = self.trainable_at(epoch)
        for name, p in self.net.named_parameters():
            p.requires_grad_(name in trainable)
        return [b for milestone, blocks, _ in self.unfreeze_plan if milestone == epoch for b in blocks]

    def group_table(self) -> list[dict]:
        return finetune.group_table(self.groups, self.net, self._optimizer_options())

    def backbone_frozen_throughout(self) -> bool:
        """True when no parameter outside the head trains at any epoch (what the feature cache needs)."""
        return all(n == self.head or n.startswith(self.head + ".") for n in self.trainable_at(10**9))

    def frozen_parameter_count(self) -> int:
        return sum(p.numel() for p in self.net.parameters() if not p.requires_grad)

    def train(self, mode: bool = True) -> ClassifierModule:
        # model.train() puts every submodule back in train mode, including BatchNorm inside frozen
        # parts, whose running statistics would then drift; keep those in eval mode.
        super().train(mode)
        if mode and (self.hparams.finetune or {}).get("freeze_bn_stats", True):
            for layer in finetune.frozen_norm_layers(self.net):
                layer.eval()
        return self

    def on_train_epoch_start(self) -> None:
        self._train_metrics_logged = False
        # only a gradual plan touches trainability here: other strategies leave it to the user's callbacks
        unfrozen = self.set_trainable(self.current_epoch) if self.unfreeze_plan else []
        if unfrozen:
            count = sum(p.numel() for n, p in self.net.named_parameters() if p.requires_grad)
            log.info("epoch %d: unfreezing %s (%s parameters now train)", self.current_epoch, ", ".join(unfrozen),
                     f"{count:,}")
        # Lightning never calls train() itself: a new module is in train mode throughout, and
        # validation restores the modes it found. Set them here, once trainability is final for
        # the epoch, so BatchNorm in blocks that are still frozen keeps its statistics.
        self.train()

    def setup(self, stage: str) -> None:
        # DDP registers only the parameters that require grad when it wraps the model (after this
        # hook): gradual unfreezing must show it every parameter that will ever train, and let
        # it skip those still frozen at each step (find_unused_parameters), or the blocks
        # unfrozen later would train unsynchronised on each process.
        if stage != "fit" or not self.unfreeze_plan:
            return
        if not self.trainer.fast_dev_run:  # a smoke run of one batch may stop before the milestones
            finetune.check_milestones([m for m, _, _ in self.unfreeze_plan], self.trainer.max_epochs)
        if self.trainer.world_size <= 1:
            return
        strategy = self.trainer.strategy
        if not isinstance(strategy, DDPStrategy) or isinstance(strategy, DeepSpeedStrategy):
            raise UserError(
                f"finetune.strategy=gradual: trainer.strategy={type(strategy).__name__} is not supported with "
                "several devices; use trainer.strategy=ddp (trainer=ddp_cpu on CPU)"
            )
        if strategy._ddp_kwargs.get("find_unused_parameters") is False:
            raise UserError("finetune.strategy=gradual under DDP needs find_unused_parameters=True; remove the False")
        strategy._ddp_kwargs["find_unused_parameters"] = True
        ever = self.trainable_at(10**9)
        for name, p in self.net.named_parameters():
            p.requires_grad_(name in ever)  # set back per epoch by on_train_epoch_start

    # ---- speed ------------------------------------------------------------------------------
    def use_channels_last(self) -> ClassifierModule:
        """Convolution weights and image batches in channels_last (NHWC) memory layout: the layout
        tensor cores work in, so cuDNN needs no transposes around each convolution under mixed
        precision. The values, the state dict's keys and the checkpoints' loading are unchanged."""
        self.channels_last = True
        self.net.to(memory_format=torch.channels_last)
        return self

    def compile_network(self, **options) -> ClassifierModule:
        """torch.compile the network in place (`nn.Module.compile`, options as torch.compile's):
        unlike `torch.compile(module)`, which wraps it, the parameters keep their names, so the state
        dict and checkpoints carry no `_orig_mod.` prefixes and load into an uncompiled model."""
        self.net.compile(**options)
        return self

    # ---- steps -------------------------------------------------------------------------------
    @property
    def head_module(self) -> nn.Module:
        """The new classification head (its input is what a frozen backbone's features are)."""
        return self.net.get_submodule(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_input:
            return self.head_module(x)
        if self.channels_last and x.ndim == 4:  # a no-op when the batch is already NHWC
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        return out if isinstance(out, torch.Tensor) else out.logits  # Inception/GoogLeNet in train mode

    def _log_metrics(self, metrics: MetricCollection, progress_bar: str = "") -> None:
        # Metric objects: Lightning computes them once per epoch (synchronised across processes)
        for name, metric in metrics.items():
            self.log(name, metric, on_step=False, on_epoch=True, prog_bar=name == progress_bar)

    def _step(self, batch, metrics: MetricCollection, criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = criterion(logits, y)  # y: class indices, or class probabilities (MixUp/CutMix batches)
        metrics.update(logits.detach(), y.argmax(dim=1) if y.ndim == 2 else y)  # mixed: the dominant class
        return loss, logits

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # Each self.log call costs about a millisecond of CPU, every step (Lightning's result collection): a
        # frozen-backbone step is ~10 ms. So the step loss is logged only on the steps Lightning writes to the
        # loggers (log_every_n_steps, its own test), and the epoch values are Metric objects updated here and
        # handed to Lightning once an epoch, which computes them from all the epoch's updates, synchronised
        # across processes, then resets them. Not on the progress bar either: callbacks.progress_bar shows it.
        loss, _ = self._step(batch, self.train_metrics, self.criterion)
        self.train_loss.update(loss, batch[1].shape[0])
        trainer = self._trainer  # None when a notebook calls training_step by hand: then log as Lightning would
        if trainer is None or getattr(trainer._logger_connector, "should_update_logs", True) or trainer.fast_dev_run:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False)
        if not self._train_metrics_logged:
            self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
            self._log_metrics(self.train_metrics)
            self._train_metrics_logged = True
        return loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, logits = self._step(batch, self.val_metrics, self.eval_criterion)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self._log_metrics(self.val_metrics, progress_bar="val/acc")
        return logits.argmax(dim=1)  # predicted classes, for callbacks (on_validation_batch_end's outputs)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, logits = self._step(batch, self.test_metrics, self.eval_criterion)
        self.test_confusion.update(logits.argmax(dim=1), batch[1])
        self.log("test/loss", loss, on_epoch=True, sync_dist=True)
        self._log_metrics(self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.confusion = self.test_confusion.compute().cpu()
        self.test_confusion.reset()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=1)

    # ---- optimizer ---------------------------------------------------------------------------
    def _optimizer_options(self) -> dict:
        optim = dict(self.hparams.optim or {})
        for key in ("_target_", "groups", "rest", "lr", "no_decay_norm_bias", "scale_lr", "base_batch_size"):
            optim.pop(key, None)
        return optim

    def _build_optimizer(self, lr_factor: float = 1.0):
        params = dict(self.net.named_parameters())
        param_groups = [
            {"name": g.name, "params": [params[n] for n in g.names], **g.options} for g in self.groups
        ]
        for group in param_groups:
            group["lr"] *= lr_factor
        target = (self.hparams.optim or {}).get("_target_", "SGD")
        return build_optimizer(param_groups, target, **self._optimizer_options())

    def _check_recipe(self) -> None:
        """Build a throwaway optimizer and scheduler: a wrong name or option fails now, before any
        data is loaded, instead of when Lightning calls configure_optimizers."""
        sched = dict(self.hparams.scheduler or {"name": "none"})
        build_scheduler(self._build_optimizer(), total_steps=10**9, steps_per_epoch=1, **sched)

    def lr_scaling(self) -> dict | None:
        """optim.scale_lr=linear|sqrt: every group's lr times (global batch / optim.base_batch_size), or its
        square root, the global batch being data.batch_size x processes x accumulate_grad_batches (Goyal et
        al.'s linear rule for SGD, the square-root rule for adaptive optimizers). Computed when Lightning
        builds the optimizer, once the number of processes is known."""
        optim = self.hparams.optim or {}
        rule = optim.get("scale_lr")
        if not rule:
            return None
        if rule not in ("linear", "sqrt"):
            raise UserError(f"optim.scale_lr={rule!r}: choose linear, sqrt or null")
        trainer = self.trainer
        trainer.estimated_stepping_batches  # loads the training loader, if Lightning has not yet
        per_device = getattr(trainer.train_dataloader, "batch_size", None)
        if not per_device:
            raise UserError("optim.scale_lr: the training loader has no fixed batch_size (a batch_sampler?); "
                            "set optim.scale_lr=null and scale optim.lr by hand")
        batch = per_device * trainer.world_size * trainer.accumulate_grad_batches
        base = int(optim.get("base_batch_size", 256))
        factor = batch / base if rule == "linear" else math.sqrt(batch / base)
        sched = self.hparams.scheduler or {}
        name = sched.get("name", "none")
        if factor > 1 and not (name == "onecycle" or name in WARMUP_SHAPES and sched.get("warmup_epochs")):
            log.warning("optim.scale_lr=%s raises every lr %.3gx without a warm-up: large-batch training usually "
                        "needs one (scheduler=onecycle, or scheduler.warmup_epochs=5 with cosine/linear)", rule, factor)
        return {"rule": rule, "global_batch": batch, "per_device": per_device, "processes": trainer.world_size,
                "accumulate": trainer.accumulate_grad_batches, "base_batch_size": base, "factor": factor}

    def configure_optimizers(self):
        scaling = self.lr_scaling()
        if scaling is not None and self.trainer.is_global_zero:
            log.info("optim.scale_lr=%s: global batch %d (%d x %d processes x %d accumulated) / %d: every lr x %.4g",
                     scaling["rule"], scaling["global_batch"], scaling["per_device"], scaling["processes"],
                     scaling["accumulate"], scaling["base_batch_size"], scaling["factor"])
        self.applied_lr_scaling = scaling
        optimizer = self._build_optimizer(scaling["factor"] if scaling else 1.0)
        total = self.trainer.estimated_stepping_batches
        per_epoch = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
        sched = dict(self.hparams.scheduler or {"name": "none"})
        scheduler = build_scheduler(optimizer, total_steps=total, steps_per_epoch=per_epoch, **sched)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_train_start(self) -> None:
        # A resumed run restores its scheduler, whose length was planned for the original run;
        # OneCycle would fail past its end and cosine/linear would stop decaying mid-run.
        planned_total = self.trainer.estimated_stepping_batches
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            factor = (getattr(sched, "lr_lambdas", None) or [None])[0]
            planned = getattr(sched, "total_steps", None) or (
                factor.total if isinstance(factor, WarmupSchedule) and factor.shape in ("cosine", "linear") else None
            )
            if planned is not None and planned != planned_total:
                raise UserError(
                    f"ckpt_path: the checkpoint's {self.hparams.scheduler['name']} schedule spans {planned} steps, "
                    f"this run {planned_total}; resume with the same trainer.max_epochs/data.batch_size, or start "
                    "a new schedule from its weights with model.weights_path=<checkpoint> instead of ckpt_path"
                )

    # ---- checkpoint extras ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        extra = {"pretrained_used": self.weights_source.used, "weights_source": self.weights_source.source}
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:  # its arguments are in Lightning's datamodule_hyper_parameters
            extra["datamodule_target"] = f"{type(dm).__module__}.{type(dm).__qualname__}"
            if hasattr(dm, "class_info"):  # class-to-index map and images per split and class
                extra["classes"] = dm.class_info()
        checkpoint[CHECKPOINT_KEY] = {**checkpoint.get(CHECKPOINT_KEY, {}), **extra}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get(CHECKPOINT_KEY, {})
        if "pretrained_used" in extra:
            self.weights_source = backbones.WeightsSource(extra["pretrained_used"], extra["weights_source"])
