"""Test-time augmentation: the views of a batch whose class probabilities are averaged.

Views are made from the batch the evaluation pipeline produced (network input size, normalised),
on the device, in the graph: the same function serves predict, evaluate, serve and export.
five_crop: that batch enlarged by 1/0.875 (torchvision's evaluation crop ratio), then its centre
and four corners cut at the input size: five views zoomed 1.14x, each covering 87.5% of the
evaluated image's side (the plain view is not among them); ten_crop adds their mirror images.
Working on the evaluated batch keeps one pipeline per checkpoint and lets export put the views
inside the graph; the price is that corners never reach beyond the evaluation crop.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as F

from lightning_project.errors import UserError

MODES = ("none", "flip", "five_crop", "ten_crop")
CROP_RATIO = 0.875


def check_mode(mode: str, where: str = "tta") -> str:
    if mode not in MODES:
        raise UserError(f"{where}={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """`x` (N, C, H, W) as the list of views `mode` averages over (the first is `x` itself, or its centre)."""
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(-1)]
    size = list(x.shape[-2:])
    larger = [round(s / CROP_RATIO) for s in size]
    big = F.resize(x, larger, antialias=True)
    crops = list(F.five_crop(big, size))  # corners, then centre
    crops = [crops[4], *crops[:4]]
    if mode == "ten_crop":
        crops += [c.flip(-1) for c in crops]
    return crops


def average_probabilities(model: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Softmax of `model` on each view of `x`, averaged (N, classes)."""
    out = [model(v).float().softmax(dim=1) for v in views(x, mode)]
    return torch.stack(out).mean(dim=0)
