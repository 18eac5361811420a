"""Learning-rate schedules as Lightning scheduler configs, correct for every parameter group.

OneCycle gets one max_lr per group (each group's own lr) and steps every batch over
`trainer.estimated_stepping_batches`; the warm-up schedules scale each group's own lr, so
discriminative learning rates keep their ratios through warm-up and decay.
"""

from __future__ import annotations

import inspect
import math

from torch.optim import Optimizer, lr_scheduler

from lightning_project.errors import UserError

SCHEDULERS = ("onecycle", "cosine", "linear", "constant", "inverse_sqrt", "step", "multistep", "plateau", "none")
WARMUP_SHAPES = ("cosine", "linear", "constant", "inverse_sqrt")
PLANNED = ("onecycle", "cosine", "linear")  # shaped over the whole run: they need its length


class WarmupSchedule:
    """Factor for LambdaLR: linear warm-up over `warmup` steps, then `shape` down to `min_ratio`.

    A callable object rather than a closure, so LambdaLR saves it in checkpoints and a resumed
    run continues the same curve. (torch's SequentialLR chains two schedulers whose states
    must agree; one factor function per step is simpler and keeps per-group ratios exact.)
    """

    def __init__(self, shape: str, total: int, warmup: int, min_ratio: float = 0.0) -> None:
        self.shape, self.total, self.warmup, self.min_ratio = shape, total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.shape == "constant":
            return 1.0
        if self.shape == "inverse_sqrt":
            return math.sqrt(max(self.warmup, 1) / (step + 1))
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.shape == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * decay


# what each schedule computes itself (the rest of torch's arguments are its options)
_OWN = {"optimizer", "max_lr", "total_steps", "epochs", "steps_per_epoch", "last_epoch", "verbose"}
_TORCH = {"onecycle": lr_scheduler.OneCycleLR, "step": lr_scheduler.StepLR, "multistep": lr_scheduler.MultiStepLR,
          "plateau": lr_scheduler.ReduceLROnPlateau}


def scheduler_options(name: str) -> set[str]:
    """The option keys scheduler=`name` takes besides `name` (empty for an unknown name)."""
    if name in _TORCH:
        taken = set(inspect.signature(_TORCH[name]).parameters) - _OWN
        return taken | {"monitor"} if name == "plateau" else taken
    return {"cosine": {"warmup_epochs", "min_lr_ratio"}, "linear": {"warmup_epochs", "min_lr_ratio"},
            "constant": {"warmup_epochs"}, "inverse_sqrt": {"warmup_epochs"}}.get(name, set())


def build_scheduler(
    optimizer: Optimizer,
    name: str = "none",
    total_steps: int = 1,
    steps_per_epoch: int = 1,
    **options,
) -> dict:
    """A Lightning `lr_scheduler` dict named 'lr', so every group's lr is logged as `lr/<group>`.

    onecycle: options of torch's OneCycleLR (pct_start, div_factor, ...), per batch.
    cosine | linear | constant | inverse_sqrt: linear warm-up of `warmup_epochs`, then that shape
    down to `min_lr_ratio` times each group's lr, per batch.
    step (step_size, gamma) | multistep (milestones, gamma): per epoch.
    plateau: ReduceLROnPlateau on `monitor` (mode, factor, patience, ...), per epoch.
    none: every group keeps its lr (still logged).
    """
    where = f"scheduler={name}"
    if name not in SCHEDULERS:
        raise UserError(f"scheduler.name={name!r}: choose one of {', '.join(SCHEDULERS)}")
    unknown = sorted(set(options) - scheduler_options(name))
    if unknown:
        raise UserError(f"scheduler.{unknown[0]}: scheduler={name} does not take it; its options: "
                        f"{', '.join(sorted(scheduler_options(name))) or 'none'}")
    warmup_epochs = float(options.pop("warmup_epochs", 0.0))
    min_lr_ratio = float(options.pop("min_lr_ratio", 0.0))
    monitor = options.pop("monitor", "val/loss")
    if name in PLANNED and (total_steps < 1 or total_steps == math.inf):
        raise UserError(
            f"{where}: needs a finite number of training steps; set trainer.max_epochs or trainer.max_steps"
        )
    total_steps = total_steps if math.isfinite(total_steps) else 2**62  # an open-ended run (no planned shape)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup_epochs < 0 or (warmup >= total_steps and name in WARMUP_SHAPES and name != "constant"):
        raise UserError(
            f"scheduler.warmup_epochs={warmup_epochs}: {warmup} warm-up steps but only {total_steps} "
            "training steps; shorten the warm-up or train longer"
        )
    try:
        if name == "onecycle":
            max_lr = [g["lr"] for g in optimizer.param_groups]
            sched = lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=int(total_steps), **options)
            return {"scheduler": sched, "interval": "step", "name": "lr"}
        if name in WARMUP_SHAPES or name == "none":
            if options:
                raise TypeError(f"unexpected option(s) {', '.join(options)}")
            shape = "constant" if name == "none" else name
            sched = lr_scheduler.LambdaLR(optimizer, WarmupSchedule(shape, int(total_steps), warmup, min_lr_ratio))
            return {"scheduler": sched, "interval": "step", "name": "lr"}
        if name == "step":
            return {"scheduler": lr_scheduler.StepLR(optimizer, **options), "interval": "epoch", "name": "lr"}
        if name == "multistep":
            milestones = list(options.pop("milestones", []))
            if milestones != sorted(milestones) or not milestones:
                raise UserError(f"scheduler.milestones={milestones}: give increasing epoch numbers")
            sched = lr_scheduler.MultiStepLR(optimizer, milestones=milestones, **options)
            return {"scheduler": sched, "interval": "epoch", "name": "lr"}
        sched = lr_scheduler.ReduceLROnPlateau(optimizer, **options)
        return {"scheduler": sched, "interval": "epoch", "monitor": monitor, "name": "lr", "strict": True}
    except TypeError as e:
        raise UserError(f"{where}: unknown or missing option ({e}); see conf/scheduler/{name}.yaml") from None
