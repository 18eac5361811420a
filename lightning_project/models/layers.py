"""Layers torchvision lacks: a deterministic adaptive average pooling for `trainer.deterministic=true`."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn
from torch.nn.modules.utils import _pair


@lru_cache(maxsize=64)
def _window_matrix(size: int, out: int) -> torch.Tensor:
    """(out, size) matrix averaging PyTorch's adaptive windows [floor(i*size/out), ceil((i+1)*size/out))."""
    m = torch.zeros(out, size, dtype=torch.float64)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class DeterministicAdaptiveAvgPool2d(nn.Module):
    """`nn.AdaptiveAvgPool2d` with a deterministic backward on CUDA.

    CUDA's adaptive_avg_pool2d backward uses atomic adds and has no deterministic variant, so
    `torch.use_deterministic_algorithms(True)` (Lightning's `deterministic=True`) stops every VGG and
    ResNet at its first backward. Lightning's `deterministic="warn"` only silences that; instead,
    adaptive averaging is linear, out = A_h @ x @ A_w^T, and matrix products are deterministic. Same
    windows as PyTorch, any input size (up- or down-sampling), a plain mean for the usual 1x1 case.
    """

    def __init__(self, output_size) -> None:
        super().__init__()
        self.output_size = _pair(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        oh, ow = (o if o is not None else s for o, s in zip(self.output_size, (h, w)))
        if (oh, ow) == (1, 1):
            return x.mean(dim=(-2, -1), keepdim=True)
        if (oh, ow) == (h, w):
            return x
        ah = _window_matrix(h, oh).to(device=x.device, dtype=x.dtype)
        aw = _window_matrix(w, ow).to(device=x.device, dtype=x.dtype)
        return ah @ x @ aw.T

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


def make_pooling_deterministic(net: nn.Module) -> int:
    """Swap every AdaptiveAvgPool2d in `net` for the deterministic version; returns how many."""
    paths = [p for p, m in net.named_modules() if type(m) is nn.AdaptiveAvgPool2d]
    for path in paths:
        net.set_submodule(path, DeterministicAdaptiveAvgPool2d(net.get_submodule(path).output_size))
    return len(paths)
