"""Learning-rate range test that keeps the ratios between parameter groups.

Lightning's `Tuner.lr_find` sets every parameter group to the same lr at each step, so with
discriminative learning rates (body 1e-4, neck 5e-4, head 1e-3) it measures a recipe nobody will
run. Here one multiplier sweeps exponentially and every group runs at its configured lr times
that multiplier: the curve is drawn against the base lr (`optim.lr`), and the suggestion is a
base lr, each group's own lr following from its ratio.

The sweep trains a deep copy of the module on real training batches (its transforms, its
optimizer, the run's device and precision), records the loss, smooths it with a bias-corrected
moving average and stops once it exceeds `early_stop` x its best. The suggestion is the steepest
descent of the smoothed curve (fast.ai's and Lightning's rule); the lr at the minimum / 10 is
reported too, a more conservative choice.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lightning_fabric import Fabric

from lightning_project.models import ClassifierModule
from lightning_project.tuning.options import LRFinder
from lightning_project.tuning.report import CheckResult
from lightning_project.utils.summary import subplots


@dataclass
class Sweep:
    base_lrs: list[float] = field(default_factory=list)  # optim.lr equivalent at each step
    losses: list[float] = field(default_factory=list)  # raw training loss at each step
    smoothed: list[float] = field(default_factory=list)
    group_lrs: dict[str, list[float]] = field(default_factory=dict)  # read back from the optimizer
    ratios: dict[str, float] = field(default_factory=dict)  # each group's lr / optim.lr
    stopped_early: bool = False
    suggestion: int | None = None  # index of the steepest descent
    minimum: int | None = None  # index of the lowest smoothed loss

    @property
    def suggested_lr(self) -> float | None:
        return None if self.suggestion is None else self.base_lrs[self.suggestion]

    @property
    def min_loss_lr(self) -> float | None:
        """The lr at the lowest smoothed loss, divided by 10."""
        return None if self.minimum is None else self.base_lrs[self.minimum] / 10


def _cycle(loader):
    while True:
        yield from loader


def sweep(fabric: Fabric, module: ClassifierModule, train_loader, base_lr: float, options: LRFinder) -> Sweep:
    """Run the range test on a copy of `module`; the module itself is left as it was."""
    work = copy.deepcopy(module).train_widest()  # gradual: the lr of the fully unfrozen phase
    work.train()
    optimizer = work._build_optimizer()
    result = Sweep(ratios={g["name"]: g["lr"] / base_lr for g in optimizer.param_groups})
    result.group_lrs = {name: [] for name in result.ratios}
    model, optimizer = fabric.setup(work, optimizer)
    growth = (options.max_lr / options.min_lr) ** (1 / (options.num_steps - 1))
    beta, average, best = options.smoothing, 0.0, math.inf
    for step, batch in zip(range(options.num_steps), _cycle(train_loader)):
        lr = options.min_lr * growth**step
        for group in optimizer.param_groups:
            group["lr"] = result.ratios[group["name"]] * lr
        x, y = fabric.to_device(batch)
        loss = work.criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            result.stopped_early = True
            break
        average = beta * average + (1 - beta) * value
        smoothed = average / (1 - beta ** (step + 1))  # bias correction: the average starts at 0
        result.base_lrs.append(lr)
        result.losses.append(value)
        result.smoothed.append(smoothed)
        for group in optimizer.param_groups:
            result.group_lrs[group["name"]].append(group["lr"])
        best = min(best, smoothed)
        if options.early_stop is not None and step > 0 and smoothed > options.early_stop * best:
            result.stopped_early = True
            break
    result.suggestion, result.minimum = suggest(result.base_lrs, result.smoothed)
    return result


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[int | None, int | None]:
    """(steepest-descent index, minimum index) of a smoothed loss curve.

    The first tenth is skipped (the average is still settling there) and only the part before the
    minimum is searched: past it the loss is rising, however steeply it fell just before. Slopes are
    central differences over the whole curve, so the last point before the minimum is not judged
    by a one-sided difference."""
    if len(smoothed) < 3:
        return None, None
    minimum = int(np.argmin(smoothed))
    start = min(max(1, len(smoothed) // 10), minimum)
    if minimum - start < 2:
        return None, minimum
    slopes = np.gradient(np.asarray(smoothed, dtype=float), np.log10(lrs))
    return start + int(np.argmin(slopes[start:minimum])), minimum


def plot(result: Sweep, path: Path) -> None:
    fig, ax = subplots(figsize=(7, 4.5))
    ax.plot(result.base_lrs, result.losses, color="tab:blue", alpha=0.3, label="loss")
    ax.plot(result.base_lrs, result.smoothed, color="tab:blue", label="smoothed")
    if result.suggestion is not None:
        lr = result.suggested_lr
        groups = ", ".join(f"{name} {ratio * lr:.2g}" for name, ratio in result.ratios.items())
        ax.axvline(lr, color="tab:red", linestyle="--", label=f"steepest: optim.lr={lr:.2g} ({groups})")
        ax.plot([lr], [result.smoothed[result.suggestion]], "o", color="tab:red")
    if result.minimum is not None:
        lr = result.min_loss_lr
        ax.axvline(lr, color="tab:green", linestyle=":", label=f"min-loss / 10: {lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate (optim.lr); every group at its own ratio")
    ax.set_ylabel("training loss")
    if result.smoothed:  # from the lowest loss to a little above the start: the divergence runs off the top
        top = max(result.smoothed[: (result.minimum or 0) + 1])
        ax.set_ylim(min(result.losses) * 0.95, top + 0.3 * (top - min(result.smoothed)) + 1e-3)
    ax.set_title("learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")  # the loss starts high on the left: that corner stays empty
    fig.savefig(path, dpi=100)


def check(
    fabric: Fabric, module: ClassifierModule, train_loader, base_lr: float, options: LRFinder,
    plot_path: Path | None = None,
) -> CheckResult:
    result = sweep(fabric, module, train_loader, base_lr, options)
    if plot_path is not None:
        plot(result, plot_path)
    details = {
        "suggested_lr": result.suggested_lr,
        "min_loss_lr_div10": result.min_loss_lr,
        "group_lrs_at_suggestion": {n: r * result.suggested_lr for n, r in result.ratios.items()}
        if result.suggested_lr is not None else None,
        "ratios": result.ratios,
        "configured_lr": base_lr,
        "stopped_early": result.stopped_early,
        "steps": len(result.losses),
        "curve": {"base_lr": result.base_lrs, "loss": result.losses, "smoothed": result.smoothed,
                  "group_lr": result.group_lrs},
    }
    expect = f"a descent between {options.min_lr:g} and {options.max_lr:g} (configured optim.lr={base_lr:g})"
    if len(result.losses) < 3:
        return CheckResult("lr_finder", "fail", None, expect,
                           f"the loss was not finite from min_lr={options.min_lr:g} on: lower tune.lr_finder.min_lr, "
                           "or check the data and the model", details)
    if result.suggestion is None:
        fallback = result.min_loss_lr
        details["suggested_lr"] = fallback
        return CheckResult("lr_finder", "warn", fallback, expect,
                           "no clear descent: the loss rose from the start (lower tune.lr_finder.min_lr) or never "
                           f"fell (the model does not train); min-loss / 10 = {fallback:.3g}", details)
    lr = result.suggested_lr
    groups = ", ".join(f"{n} {r * lr:.2g}" for n, r in result.ratios.items())
    message = f"optim.lr={lr:.3g} (steepest descent; min-loss/10 = {result.min_loss_lr:.3g}); groups: {groups}"
    if result.minimum == len(result.losses) - 1 and not result.stopped_early:
        return CheckResult("lr_finder", "warn", lr, expect,
                           f"{message}; the loss was still falling at max_lr: raise tune.lr_finder.max_lr", details)
    return CheckResult("lr_finder", "ok", lr, expect, message, details)
