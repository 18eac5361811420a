"""Augmentation pipelines from plain specs: torchvision transforms v2, named and ordered.

A pipeline spec is a mapping `step name -> {_target_: TransformName, **arguments}` (or a list of
such specs). A mapping is easy to edit from the command line: `augment.train.blur=null` drops a
step, `+augment.train.jitter={_target_:ColorJitter,brightness:0.2}` appends one. `_target_` is a
class of `torchvision.transforms.v2` or any import path. We build it ourselves rather than with
`hydra.utils.instantiate` because a checkpoint must rebuild its evaluation pipeline in a process
without Hydra, and a misspelt name should list the close names.

Every pipeline starts by converting to an image tensor and ends with float conversion and the
network's normalisation, so specs hold only the augmentations. A step `normalize: auto` moves the
conversion and normalisation to its place, for steps that belong after it (RandomErasing as in
torchvision's references: erased patches then hold the mean colour, 0 after normalisation).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torchvision.transforms import v2

from lightning_project.errors import UserError
from lightning_project.utils.imports import resolve


def _steps(spec) -> list[tuple[str, dict]]:
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        return [(str(k), v) for k, v in spec.items() if v is not None]
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [(str(i), v) for i, v in enumerate(spec) if v is not None]
    raise UserError(f"transform pipeline must be a mapping of steps or a list, got {spec!r}")


def build_transform(spec: Mapping, where: str):
    """One transform from `{_target_: name, **arguments}`; nested specs in arguments are built too."""
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise UserError(f"{where}: expected {{_target_: TransformName, ...arguments}}, got {spec!r}")
    args = {k: _build_arg(v, f"{where}.{k}") for k, v in spec.items() if k != "_target_"}
    cls = resolve(spec["_target_"], v2, f"{where}._target_")
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        try:
            signature = str(inspect.signature(cls))
        except (TypeError, ValueError):
            signature = "(...)"
        raise UserError(f"{where}: {spec['_target_']}{signature} rejects {args} ({e})") from None


def _build_arg(value, where: str):
    if isinstance(value, Mapping) and "_target_" in value:
        return build_transform(value, where)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_build_arg(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def build_pipeline(spec, mean: Sequence[float], std: Sequence[float], where: str = "augment") -> v2.Compose:
    """ToImage -> the spec's steps -> float in [0, 1] -> Normalize(mean, std) (or where `normalize: auto` is)."""
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    steps, placed = [], False
    for name, step in _steps(spec):
        if name == "normalize" and step == "auto":
            steps, placed = steps + normalize, True
        else:
            steps.append(build_transform(step, f"{where}.{name}"))
    return v2.Compose([v2.ToImage(), *steps, *([] if placed else normalize)])
