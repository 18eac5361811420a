"""Resolve a `_target_` name to a callable without Hydra, so checkpoints rebuild their parts in any process."""

from __future__ import annotations

import importlib
from types import ModuleType

from lightning_project.errors import UserError, close_names


def resolve(target: str, default: ModuleType, where: str) -> object:
    """`target` is a dotted import path (`torch.optim.SGD`) or a bare name looked up in `default`."""
    module_name, _, attr = str(target).rpartition(".")
    if not module_name:
        module, module_name = default, default.__name__
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise UserError(f"{where}: cannot import {module_name!r} for {target!r}; check the spelling") from None
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise UserError(f"{where}: {module_name} has no {attr!r}; close names: {close_names(attr, public)}")
    return getattr(module, attr)
