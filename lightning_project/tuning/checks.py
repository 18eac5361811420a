"""Two sanity checks of the model and its optimizer before any long run.

- Initial loss: a freshly initialised head knows nothing, so its cross-entropy over C classes
  should be close to ln(C). Far above: logits too large (head init, unnormalised inputs, an old
  head kept); far below: the answer leaks into the input or the labels are degenerate.
- Overfit one batch: any working model/optimizer pair memorises a handful of images. If the loss
  on one fixed batch does not fall near zero, a longer run will not fix it (frozen layers, an lr
  off by orders of magnitude, wrong labels, a broken loss).

Both run on a deep copy of the module, on the device and at the precision of the real run
(through Lightning Fabric), so the module handed in is untouched for the checks that follow.
They report plain cross-entropy (without label smoothing, whose minimum is not zero); the overfit
steps optimise the module's own criterion.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning_fabric import Fabric

from lightning_project.models import ClassifierModule
from lightning_project.tuning.options import InitialLoss, OverfitBatch
from lightning_project.tuning.report import CheckResult
from lightning_project.utils.summary import subplots


def initial_loss(fabric: Fabric, module: ClassifierModule, train_loader, options: InitialLoss) -> CheckResult:
    """Mean cross-entropy of the untrained model (eval mode, no update) over a few training batches."""
    model = fabric.setup_module(copy.deepcopy(module))
    model.eval()
    total, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for _, batch in zip(range(options.batches), train_loader):
            x, y = fabric.to_device(batch)
            logits = model(x).float()
            total += F.cross_entropy(logits, y, reduction="sum").item()  # y: indices, or probabilities (mixing)
            correct += int((logits.argmax(dim=1) == (y.argmax(dim=1) if y.ndim == 2 else y)).sum())
            seen += len(y)
    num_classes = module.hparams.num_classes
    expected = math.log(num_classes)
    loss = total / seen
    ratio = loss / expected
    low, high = options.band
    details = {"loss": loss, "ln_classes": expected, "ratio": ratio, "accuracy": correct / seen, "images": seen,
               "num_classes": num_classes, "band": list(options.band)}
    expect = f"ln({num_classes}) = {expected:.3f} (ratio in [{low:g}, {high:g}])"
    if not math.isfinite(loss):
        return CheckResult("initial_loss", "fail", loss, expect,
                           "the loss is not finite before any training: check the inputs (NaN pixels?) and the model",
                           details)
    if ratio > high:
        message = (f"{ratio:.2f} x ln(C): the fresh model is confidently wrong; check that inputs are normalised "
                   "(model's mean/std), that the head was replaced and initialised small, and the labels")
        return CheckResult("initial_loss", "warn", loss, expect, message, details)
    if ratio < low:
        message = (f"{ratio:.2f} x ln(C): suspiciously good before training; look for labels leaking into the "
                   "inputs, one class dominating the batches, or a head that was not re-initialised")
        return CheckResult("initial_loss", "warn", loss, expect, message, details)
    return CheckResult("initial_loss", "ok", loss, expect,
                       f"{ratio:.2f} x ln(C), accuracy {correct / seen:.2f} (chance {1 / num_classes:.2f})", details)


def fixed_batch(dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` training images drawn once (seeded) and stacked: their augmentation is drawn once
    too, so every step sees exactly the same tensors."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:size].tolist()
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.as_tensor([int(y) for _, y in items])


def overfit_batch(
    fabric: Fabric, module: ClassifierModule, batch: tuple[torch.Tensor, torch.Tensor], base_lr: float,
    options: OverfitBatch, plot_path: Path | None = None,
) -> CheckResult:
    """Train a copy on one fixed batch with the configured optimizer and groups at constant lr
    (no schedule: a warm-up would only hide the answer) until the loss is below the target."""
    work = copy.deepcopy(module)
    work.train()
    optimizer = work._build_optimizer()
    scale = 1.0 if options.lr is None else options.lr / base_lr  # every group moves together: ratios kept
    for group in optimizer.param_groups:
        group["lr"] *= scale
    model, optimizer = fabric.setup(work, optimizer)
    x, y = fabric.to_device(batch)
    curve: list[float] = []  # curve[k]: cross-entropy after k updates
    reached = None
    for step in range(options.max_steps + 1):
        logits = model(x).float()
        ce = F.cross_entropy(logits.detach(), y).item()
        curve.append(ce)
        if not math.isfinite(ce) or ce < options.target_loss:
            reached = step if math.isfinite(ce) else None
            break
        if step == options.max_steps:
            break
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(work.criterion(logits, y))
        optimizer.step()
    lr = base_lr * scale
    if plot_path is not None:
        plot_overfit(curve, options.target_loss, lr, len(y), plot_path)
    details = {"curve": curve, "steps": len(curve) - 1, "steps_to_target": reached, "batch_size": len(y),
               "lr": lr, "initial": curve[0], "final": curve[-1]}
    expect = f"< {options.target_loss:g} within {options.max_steps} steps"
    if reached is not None:
        return CheckResult("overfit_batch", "ok", curve[-1], expect,
                           f"memorised {len(y)} images in {reached} steps (loss {curve[0]:.3g} -> {curve[-1]:.3g})",
                           details)
    first, last = curve[0], curve[-1]
    if not math.isfinite(last):
        hint = f"diverged (loss {last}) after {len(curve) - 1} steps: lr {lr:.3g} is too high; lower optim.lr"
    elif last > 0.9 * first:
        hint = (f"barely moved ({first:.3g} -> {last:.3g}): lr {lr:.3g} is far too small, or almost everything "
                "is frozen (finetune=, optim.rest=freeze); check the groups table")
    else:
        hint = (f"still {last:.3g} after {options.max_steps} steps (from {first:.3g}): allow more steps "
                "(tune.overfit_batch.max_steps) or raise the lr; if it stalls, check labels and loss")
    return CheckResult("overfit_batch", "fail", last, expect, hint, details)


def plot_overfit(curve: list[float], target: float, lr: float, batch_size: int, path: Path) -> None:
    fig, ax = subplots(figsize=(6, 4))
    finite = [(k, v) for k, v in enumerate(curve) if math.isfinite(v) and v > 0]
    if finite:
        ax.plot(*zip(*finite), "o-", markersize=3, label="cross-entropy on the batch")
    ax.axhline(target, color="tab:green", linestyle="--", label=f"target {target:g}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("loss")
    ax.set_title(f"overfit one batch ({batch_size} images, base lr {lr:.3g})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(path, dpi=100)
