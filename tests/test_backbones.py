"""Networks by name, new heads, and the offline pretrained-weights paths (torchvision cache, local file)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_project.errors import UserError
from lightning_project.models import backbones
from lightning_project.models.backbones import (
    build_network,
    cached_weights_file,
    load_pretrained,
    normalization,
    weights_enum,
)


def test_unknown_model_lists_close_names():
    with pytest.raises(UserError, match=r"model.name='resnet5' is not a torchvision classification model; close names: .*resnet50"):
        build_network("resnet5", 3)


def test_unknown_weight_set_lists_the_sets():
    with pytest.raises(UserError, match="model.weights='IMAGENET2K' .* IMAGENET1K_V1"):
        weights_enum("resnet18", "IMAGENET2K")


@pytest.mark.parametrize(
    "name, head",
    [("resnet18", "fc"), ("vgg16", "classifier.6"), ("mobilenet_v3_small", "classifier.3"),
     ("shufflenet_v2_x0_5", "fc"), ("squeezenet1_1", "classifier.1"), ("efficientnet_b0", "classifier.1")],
)
def test_head_is_replaced_for_the_class_count(name, head):
    net, found = build_network(name, num_classes=7)
    assert found == head
    net.eval()
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_head_dropout_wraps_the_new_head():
    net, head = build_network("resnet18", 5, head_dropout=0.3)
    assert isinstance(net.fc, nn.Sequential) and net.fc[0].p == 0.3 and net.fc[1].out_features == 5


@pytest.mark.parametrize("bad", [1, 0])
def test_class_count_must_be_at_least_two(bad):
    with pytest.raises(UserError, match=f"data.num_classes={bad}"):
        build_network("resnet18", bad)


def test_normalisation_comes_from_the_weights_metadata():
    assert normalization("resnet18") == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_cached_state_dict_is_loaded_through_torchvision_weights_api(torch_home):
    """Write a state dict where the weights API looks for it; loading must read it, not download."""
    enum = weights_enum("resnet18")
    file = cached_weights_file(enum)
    assert str(file).startswith(str(torch_home))  # $TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth
    reference, _ = build_network("resnet18", 1000)  # ImageNet-shaped, like the real file
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), file)
    try:
        net, head = build_network("resnet18", 4)
        source = load_pretrained(net, head, "resnet18", pretrained=True, download=False)
        assert source.used and source.source == "ResNet18_Weights.IMAGENET1K_V1"
        assert torch.equal(net.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
        assert torch.equal(net.bn1.running_var, reference.bn1.running_var)
        assert net.fc.out_features == 4  # the new head keeps its own initialisation
    finally:
        file.unlink()


def test_pretrained_true_without_cache_names_the_file_to_place():
    net, head = build_network("resnet18", 4)
    with pytest.raises(UserError) as e:
        load_pretrained(net, head, "resnet18", pretrained=True, download=False)
    message = str(e.value)
    assert "model.pretrained=true" in message
    assert str(cached_weights_file(weights_enum("resnet18"))) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message


def test_pretrained_true_when_the_download_fails(monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    net, head = build_network("resnet18", 4)
    with pytest.raises(UserError, match="Name or service not known.*place https://"):
        load_pretrained(net, head, "resnet18", pretrained=True, download=True)


def test_auto_falls_back_to_random_init_with_one_loud_warning(caplog):
    net, head = build_network("resnet18", 4)
    before = net.layer1[0].conv1.weight.clone()
    with caplog.at_level(logging.WARNING, logger=backbones.__name__):
        source = load_pretrained(net, head, "resnet18", pretrained="auto", download=False)
    assert not source.used and source.source == "random"
    assert torch.equal(net.layer1[0].conv1.weight, before)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RANDOM initialisation" in warnings[0].getMessage()


def test_pretrained_value_is_checked():
    net, head = build_network("resnet18", 4)
    with pytest.raises(UserError, match="model.pretrained='yes': choose auto, true or false"):
        load_pretrained(net, head, "resnet18", pretrained="yes")


def test_weights_path_loads_a_local_state_dict_keeping_a_matching_head(tmp_path):
    trained, _ = build_network("resnet18", 4)
    path = tmp_path / "mine.pt"
    torch.save(trained.state_dict(), path)
    net, head = build_network("resnet18", 4)
    source = load_pretrained(net, head, "resnet18", weights_path=str(path))
    assert source.used and source.source == str(path)
    assert torch.equal(net.fc.weight, trained.fc.weight)  # same shape: the head is kept too


def test_weights_path_errors(tmp_path):
    net, head = build_network("resnet18", 4)
    with pytest.raises(UserError, match="model.weights_path=.*nope.pt: no such file"):
        load_pretrained(net, head, "resnet18", weights_path=str(tmp_path / "nope.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable state dict"):
        load_pretrained(net, head, "resnet18", weights_path=str(garbage))
    other, _ = build_network("resnet34", 4)
    wrong = tmp_path / "resnet34.pt"
    torch.save(other.state_dict(), wrong)
    with pytest.raises(UserError, match="does not fit ResNet.*check model.name"):
        load_pretrained(net, head, "resnet18", weights_path=str(wrong))
    vgg, _ = build_network("vgg11", 4)
    shapes = tmp_path / "vgg11.pt"
    torch.save(vgg.state_dict(), shapes)
    with pytest.raises(UserError, match="does not fit"):
        load_pretrained(net, head, "resnet18", weights_path=str(shapes))
