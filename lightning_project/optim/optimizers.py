"""Any `torch.optim` optimizer over named parameter groups, with group options checked."""

from __future__ import annotations

import inspect

import torch
from torch.optim import Optimizer

from lightning_project.errors import UserError
from lightning_project.utils.imports import resolve


def build_optimizer(param_groups: list[dict], target: str = "SGD", **options) -> Optimizer:
    """`param_groups`: torch param groups with a 'name'; `target`: torch.optim class or import path.

    torch optimizers accept unknown keys in a param group silently, so a misspelt
    `weight_decy` would be ignored; here every group key must be one of the optimizer's options.
    """
    cls = resolve(target, torch.optim, "optim._target_")
    if not (inspect.isclass(cls) and issubclass(cls, Optimizer)):
        raise UserError(f"optim._target_={target!r} is not a torch.optim.Optimizer")
    try:
        optimizer = cls(param_groups, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"optim: {cls.__name__} rejects the options {sorted(options)} ({e})") from None
    allowed = set(optimizer.defaults) | {"params", "name", "initial_lr"}
    for group in param_groups:
        unknown = sorted(set(group) - allowed)
        if unknown:
            raise UserError(
                f"optim.groups.{group.get('name')}: {cls.__name__} has no option {', '.join(unknown)}; "
                f"options: {', '.join(sorted(optimizer.defaults))}"
            )
    return optimizer
