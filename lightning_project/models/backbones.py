"""A torchvision classification model by name, its new head, and its ImageNet weights.

The network is always built with random weights first; pretrained weights are loaded afterwards
into everything but the new head. This keeps one code path for torchvision's weights API, a
local file and a checkpoint, and lets a checkpoint be rebuilt without touching the network.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from lightning_project.errors import UserError, close_names

log = logging.getLogger(__name__)


def model_names() -> list[str]:
    """Every classification model in torchvision's registry."""
    return tvm.list_models(module=tvm)


def check_model_name(name: str) -> None:
    if name not in model_names():
        raise UserError(
            f"model.name={name!r} is not a torchvision classification model; close names: "
            f"{close_names(name, model_names())} (all: torchvision.models.list_models(module=torchvision.models))"
        )


def weights_enum(name: str, weights: str = "DEFAULT") -> WeightsEnum:
    """The weight set `weights` (e.g. DEFAULT, IMAGENET1K_V1) of model `name`."""
    check_model_name(name)
    enum = tvm.get_model_weights(name)
    try:
        return enum[weights]
    except KeyError:
        raise UserError(
            f"model.weights={weights!r} is not a weight set of {name}; choose one of {', '.join(enum.__members__)}"
        ) from None


def normalization(name: str, weights: str = "DEFAULT") -> tuple[list[float], list[float]]:
    """Mean and std the weights were trained with (read from torchvision's metadata, never downloaded)."""
    preset = weights_enum(name, weights).transforms()
    return list(preset.mean), list(preset.std)


def find_head(net: nn.Module) -> str:
    """Path of the final classification layer: the last Linear/Conv2d producing the 1000 ImageNet classes."""
    heads = [
        path
        for path, m in net.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == 1000 or isinstance(m, nn.Conv2d) and m.out_channels == 1000)
        and "aux" not in path.lower()  # Inception / GoogLeNet auxiliary heads are not the classifier
    ]
    if not heads:
        raise UserError(f"model {type(net).__name__}: no 1000-class output layer found to replace with a new head")
    return heads[-1]


def build_network(name: str, num_classes: int, head_dropout: float = 0.0) -> tuple[nn.Module, str]:
    """The architecture `name` with random weights and a new `num_classes` head; returns it and the head's path."""
    check_model_name(name)
    if num_classes < 2:
        raise UserError(f"data.num_classes={num_classes}: a classifier needs at least 2 classes")
    if not 0.0 <= head_dropout < 1.0:
        raise UserError(f"model.head_dropout={head_dropout}: must be in [0, 1)")
    net = tvm.get_model(name, weights=None)
    head = find_head(net)
    old = net.get_submodule(head)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes)
    else:  # SqueezeNet-style 1x1 convolution head
        new = nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    if head_dropout > 0:
        new = nn.Sequential(nn.Dropout(head_dropout), new)
    net.set_submodule(head, new)
    return net, head


def cached_weights_file(weights: WeightsEnum) -> Path:
    """Where torchvision's weights API looks for (and downloads) `weights`: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


@dataclass
class WeightsSource:
    used: bool  # pretrained weights were loaded into the backbone
    source: str  # weights enum name, file path, or 'random'


def _fetch_imagenet(enum: WeightsEnum, download: bool, timeout: float) -> dict:
    file = cached_weights_file(enum)
    if not file.exists() and not download:
        raise FileNotFoundError(f"{file} does not exist and model.download=false")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torch.hub opens URLs without a timeout: a dead network would hang
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    finally:
        socket.setdefaulttimeout(previous)


def load_pretrained(
    net: nn.Module,
    head: str,
    name: str,
    pretrained: bool | str = "auto",
    weights: str = "DEFAULT",
    weights_path: str | None = None,
    download: bool = True,
    timeout: float = 30.0,
) -> WeightsSource:
    """Load ImageNet (or local) weights into everything but the new head.

    pretrained: True (fail when unavailable), 'auto' (fall back to random init with a warning), False.
    weights_path: a local state dict (torchvision-style, or one of our Lightning checkpoints).
    """
    if weights_path:
        state = _read_state_dict(weights_path)
        _load_backbone_state(net, head, state, f"model.weights_path={weights_path}")
        return WeightsSource(True, str(weights_path))
    mode = str(pretrained).lower()
    if mode not in {"true", "false", "auto"}:
        raise UserError(f"model.pretrained={pretrained!r}: choose auto, true or false")
    if mode == "false":
        return WeightsSource(False, "random")
    enum = weights_enum(name, weights)
    try:
        state = _fetch_imagenet(enum, download, timeout)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        file = cached_weights_file(enum)
        if mode == "true":
            raise UserError(
                f"model.pretrained=true but {enum} could not be loaded ({type(e).__name__}: {e}); "
                f"place {enum.url} at {file}, or set model.pretrained=auto|false"
            ) from None
        log.warning(
            "!!! PRETRAINED WEIGHTS UNAVAILABLE: %s is not cached at %s and could not be downloaded (%s). "
            "Training %s from RANDOM initialisation. Place the file there, or set model.pretrained=false "
            "to silence this. !!!",
            enum, file, e, name,
        )
        return WeightsSource(False, "random")
    _load_backbone_state(net, head, state, str(enum))
    return WeightsSource(True, str(enum))


def _read_state_dict(path: str) -> dict:
    if not Path(path).is_file():
        raise UserError(f"model.weights_path={path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"model.weights_path={path}: not a readable state dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj:  # one of our Lightning checkpoints
        obj = {k.removeprefix("net."): v for k, v in obj["state_dict"].items()}
    if not isinstance(obj, dict):
        raise UserError(f"model.weights_path={path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def _load_backbone_state(net: nn.Module, head: str, state: dict, where: str) -> None:
    """Load `state` into `net`; head tensors are kept only where their shapes fit the new head."""
    own = net.state_dict()
    state = {
        k: v for k, v in state.items()
        if not (k.startswith(head + ".") and (k not in own or own[k].shape != v.shape))
    }
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when strict=False
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{where}: does not fit {type(net).__name__} ({first}); check model.name") from None
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise UserError(
            f"{where}: does not fit {type(net).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected); check model.name"
        )
