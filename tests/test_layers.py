"""The deterministic adaptive pooling matches PyTorch's exactly (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_project.models.backbones import build_network
from lightning_project.models.layers import DeterministicAdaptiveAvgPool2d, make_pooling_deterministic


@pytest.mark.parametrize(
    "size, out",
    [((7, 7), (7, 7)), ((1, 1), (7, 7)), ((10, 13), (7, 7)), ((7, 7), (1, 1)), ((5, 9), (3, 4)), ((6, 8), (None, 2))],
)
def test_same_values_and_gradients_as_adaptive_avg_pool2d(size, out):
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    ours = DeterministicAdaptiveAvgPool2d(out)(x)
    theirs = F.adaptive_avg_pool2d(y, out)
    torch.testing.assert_close(ours, theirs)
    grad = torch.randn_like(theirs)
    ours.backward(grad)
    theirs.backward(grad)
    torch.testing.assert_close(x.grad, y.grad)


def test_vgg_and_resnet_pooling_is_swapped_without_changing_outputs():
    for name in ("vgg11", "resnet18"):
        net, _ = build_network(name, 3)
        net.eval()
        x = torch.randn(2, 3, 32, 32)
        before = net(x)
        assert make_pooling_deterministic(net) == 1
        torch.testing.assert_close(net(x), before)
        assert not any(type(m) is torch.nn.AdaptiveAvgPool2d for m in net.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the non-deterministic kernel exists on CUDA only")
def test_cuda_backward_runs_under_deterministic_algorithms():
    net, _ = build_network("resnet18", 3)
    net = net.cuda()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="adaptive_avg_pool2d_backward_cuda"):
            net(x).sum().backward()
        make_pooling_deterministic(net)
        grads = []
        for _ in range(2):
            net.zero_grad()
            net(x).sum().backward()
            grads.append(net.conv1.weight.grad.clone())
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(False)
