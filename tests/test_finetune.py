"""Freezing, BatchNorm statistics and parameter groups on real torchvision networks."""

from __future__ import annotations

import pytest
import torch

from lightning_project.errors import UserError
from lightning_project.models import ClassifierModule
from lightning_project.models.backbones import build_network
from lightning_project.models.finetune import (
    aliases,
    frozen_norm_layers,
    plan_groups,
    plan_trainable,
    select,
    stages,
)


@pytest.fixture(scope="module")
def vgg():
    return build_network("vgg16", num_classes=4)


@pytest.fixture(scope="module")
def resnet():
    return build_network("resnet18", num_classes=4)


def names(net):
    return [n for n, _ in net.named_parameters()]


def test_module_paths_select_whole_modules_and_regexes_match_from_the_start(resnet):
    net, _ = resnet
    assert select(names(net), ["layer4"], "t") == [n for n in names(net) if n.startswith("layer4.")]
    assert select(names(net), ["fc"], "t") == ["fc.weight", "fc.bias"]
    # a dotted path is a module, not a regex: "layer1" must not match layer10-style names
    assert all(n.startswith("layer1.") for n in select(names(net), ["layer1"], "t"))
    assert select(names(net), [r"layer[34]\.0\.conv1"], "t") == ["layer3.0.conv1.weight", "layer4.0.conv1.weight"]


def test_misspelt_pattern_is_an_error_with_the_closest_names(vgg):
    net, _ = vgg
    with pytest.raises(UserError) as e:
        select(names(net), ["classifier.0.biase"], "optim.groups.neck.patterns")
    message = str(e.value)
    assert "optim.groups.neck.patterns" in message and "'classifier.0.biase'" in message
    assert "classifier.0.bias" in message  # the fix is suggested


def test_invalid_regex_is_an_error(vgg):
    with pytest.raises(UserError, match="not a valid regular expression"):
        select(names(vgg[0]), ["features.(0"], "finetune.freeze")


def test_stages_of_vgg_and_resnet(vgg, resnet):
    assert stages(*vgg) == [
        ("features.0-4", ["features.0", "features.2"]),
        ("features.5-9", ["features.5", "features.7"]),
        ("features.10-16", ["features.10", "features.12", "features.14"]),
        ("features.17-23", ["features.17", "features.19", "features.21"]),
        ("features.24-30", ["features.24", "features.26", "features.28"]),
        ("classifier", ["classifier.0", "classifier.3"]),
        ("head", ["classifier.6"]),
    ]
    assert stages(*resnet) == [
        ("conv1+bn1", ["conv1", "bn1"]), ("layer1", ["layer1"]), ("layer2", ["layer2"]), ("layer3", ["layer3"]),
        ("layer4", ["layer4"]), ("head", ["fc"]),
    ]
    assert aliases(*resnet) == {
        "@head": ["fc"], "@neck": ["layer4"], "@body": ["conv1", "bn1", "layer1", "layer2", "layer3"],
    }


def test_strategies(vgg, resnet):
    net, head = resnet
    assert plan_trainable(net, head, "full") == set(names(net))
    assert plan_trainable(net, head, "feature_extractor") == {"fc.weight", "fc.bias"}
    partial = plan_trainable(net, head, "partial", train_stages=1)
    assert partial == {n for n in names(net) if n.startswith(("layer4.", "fc."))}
    vnet, vhead = vgg
    assert plan_trainable(vnet, vhead, "partial") == {n for n in names(vnet) if n.startswith("classifier.")}
    frozen_first = plan_trainable(vnet, vhead, "full", freeze=["features.0"])
    assert "features.0.weight" not in frozen_first and "features.2.weight" in frozen_first
    back = plan_trainable(net, head, "feature_extractor", unfreeze=["layer4.1"])
    assert "layer4.1.conv1.weight" in back and "layer4.0.conv1.weight" not in back


def test_partial_with_too_many_stages_names_the_blocks(resnet):
    with pytest.raises(UserError, match=r"finetune.train_stages=9: .* 5 blocks .*layer4"):
        plan_trainable(*resnet, "partial", train_stages=9)


def test_unknown_strategy(resnet):
    with pytest.raises(UserError, match="finetune.strategy='everything'"):
        plan_trainable(*resnet, "everything")


def test_vgg_recipe_groups_and_rest(vgg):
    net, _ = vgg
    specs = [
        {"name": "features", "patterns": ["features"], "lr": 1e-4},
        {"name": "classifier", "patterns": ["classifier.0", "classifier.3"], "lr_scale": 0.5},
        {"name": "head", "patterns": ["classifier.6"], "momentum": 0.8},
    ]
    groups, frozen = plan_groups(net, specs, base_lr=1e-3, rest="freeze")
    assert [(g.name, g.options["lr"]) for g in groups] == [("features", 1e-4), ("classifier", 5e-4), ("head", 1e-3)]
    assert groups[2].options["momentum"] == 0.8
    assert frozen == []  # the three groups cover VGG-16 entirely
    assert sum(len(g.names) for g in groups) == len(names(net))


def test_ungrouped_parameters_go_to_a_default_group_or_are_frozen(resnet):
    net, _ = resnet
    groups, frozen = plan_groups(net, [{"name": "head", "patterns": ["fc"], "lr": 1e-2}], base_lr=1e-3)
    assert [g.name for g in groups] == ["head", "default"]
    assert groups[1].options["lr"] == 1e-3 and len(groups[1].names) == len(names(net)) - 2
    groups, frozen = plan_groups(net, [{"name": "head", "patterns": ["fc"]}], base_lr=1e-3, rest="freeze")
    assert [g.name for g in groups] == ["head"] and len(frozen) == len(names(net)) - 2


def test_overlapping_groups_are_an_error(vgg):
    specs = [{"name": "a", "patterns": ["classifier"]}, {"name": "b", "patterns": ["classifier.6"]}]
    with pytest.raises(UserError, match=r"optim.groups.b: parameter classifier.6.weight is also claimed by group 'a'"):
        plan_groups(vgg[0], specs, base_lr=1e-3)


@pytest.mark.parametrize(
    "specs, message",
    [
        ([{"name": "a"}], r"optim.groups\[0\]: needs a name and a non-empty patterns list"),
        ([{"name": "a", "patterns": ["fc"], "lr": 1e-3, "lr_scale": 2}], "set lr .* or lr_scale"),
        ([{"name": "a", "patterns": ["fc"], "lr": -1}], r"optim.groups.a.lr=-1.0: the learning rate must be positive"),
        ([{"name": "default", "patterns": ["fc"]}], "used twice"),
        ([{"name": "a", "patterns": ["@neck"]}, {"name": "a", "patterns": ["fc"]}], "used twice"),
        ([{"name": "a", "patterns": ["@tail"]}], "unknown or empty alias '@tail'"),
    ],
)
def test_group_spec_errors(resnet, specs, message):
    with pytest.raises(UserError, match=message):
        plan_groups(resnet[0], specs, base_lr=1e-3, alias=aliases(*resnet))


def test_module_keeps_frozen_batchnorm_in_eval_mode_after_train():
    module = ClassifierModule("resnet18", num_classes=3, finetune={"strategy": "partial"})
    module.train()
    frozen = frozen_norm_layers(module.net)
    assert frozen and all(not m.training for m in frozen)
    assert module.net.layer4[0].bn1.training  # trainable stage: statistics update as usual
    assert module.net.layer1[0].bn1 in frozen
    before = module.net.layer1[0].bn1.running_mean.clone()
    module(torch.randn(4, 3, 32, 32))
    assert torch.equal(module.net.layer1[0].bn1.running_mean, before)
    assert not torch.equal(module.net.layer4[0].bn1.running_mean, torch.zeros(512))


def test_freeze_bn_stats_false_lets_frozen_statistics_move():
    module = ClassifierModule(
        "resnet18", num_classes=3, finetune={"strategy": "feature_extractor", "freeze_bn_stats": False}
    ).train()
    before = module.net.bn1.running_mean.clone()
    module(torch.randn(4, 3, 32, 32))
    assert not torch.equal(module.net.bn1.running_mean, before)


def test_group_table_counts_trainable_and_frozen():
    module = ClassifierModule(
        "resnet18", num_classes=3,
        finetune={"strategy": "feature_extractor"},
        optim={"_target_": "SGD", "lr": 0.1, "weight_decay": 1e-4,
               "groups": [{"name": "head", "patterns": ["@head"], "lr_scale": 1.0}]},
    )
    rows = {r["group"]: r for r in module.group_table()}
    assert rows["head"]["tensors"] == "1/1" and rows["head"]["trainable"] == 512 * 3
    assert rows["head:no_decay"]["trainable"] == 3 and rows["head:no_decay"]["weight_decay"] == 0
    assert rows["default"]["trainable"] == 0 and rows["default"]["lr"] == 0.1
    assert rows["default"]["weight_decay"] == 1e-4
    assert module.frozen_parameter_count() == rows["default"]["frozen"] + rows["default:no_decay"]["frozen"]


def test_nothing_trainable_is_an_error():
    with pytest.raises(UserError, match="no parameter is left trainable"):
        ClassifierModule(
            "resnet18", num_classes=3, finetune={"strategy": "feature_extractor"},
            optim={"groups": [{"name": "body", "patterns": ["layer1"]}], "rest": "freeze"},
        )
