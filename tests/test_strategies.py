"""The fine-tuning toolkit below the Trainer: gradual plans, discriminative lrs, no decay on norms and biases."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_project.errors import UserError
from lightning_project.models import ClassifierModule
from lightning_project.models.backbones import build_network
from lightning_project.models.finetune import unfreeze_schedule


@pytest.fixture(scope="module")
def resnet():
    return build_network("resnet18", 3)


def test_gradual_schedule_unfreezes_one_block_per_milestone_and_the_rest_at_the_last(resnet):
    plan = unfreeze_schedule(*resnet, [2, 4, 6])
    assert [(e, blocks) for e, blocks, _ in plan] == [
        (2, ["layer4"]), (4, ["layer3"]), (6, ["layer2", "layer1", "conv1+bn1"]),
    ]
    assert plan[-1][2] == ["layer2", "layer1", "conv1", "bn1"]


@pytest.mark.parametrize("milestones, message", [
    ([4, 2], r"finetune.milestones=\[4, 2\]: give increasing epoch numbers >= 1"),
    ([0, 1], "give increasing epoch numbers >= 1"),
    ([], "give increasing"),
    ([1, 2, 3, 4, 5, 6], r"ResNet has 5 blocks below the head \(layer4, layer3, layer2, layer1, conv1\+bn1\)"),
])
def test_bad_milestones_are_one_line_errors(resnet, milestones, message):
    with pytest.raises(UserError, match=message):
        unfreeze_schedule(*resnet, milestones)


def test_module_trainable_set_follows_the_epoch():
    module = ClassifierModule("resnet18", 3, finetune={"strategy": "gradual", "milestones": [1, 3]})
    trainable = lambda: {n.split(".")[0] for n, p in module.net.named_parameters() if p.requires_grad}
    assert trainable() == {"fc"}
    assert module.set_trainable(1) == ["layer4"] and trainable() == {"fc", "layer4"}
    assert module.set_trainable(2) == [] and trainable() == {"fc", "layer4"}
    assert module.set_trainable(3) == ["layer3", "layer2", "layer1", "conv1+bn1"]
    assert trainable() == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}
    assert module.set_trainable(0) == [] and trainable() == {"fc"}  # a resumed run recomputes it from its epoch
    assert not module.backbone_frozen_throughout()
    assert ClassifierModule("resnet18", 3, finetune={"strategy": "feature_extractor"}).backbone_frozen_throughout()


def test_freeze_patterns_stay_frozen_through_gradual_unfreezing():
    module = ClassifierModule("resnet18", 3, finetune={"strategy": "gradual", "milestones": [1], "freeze": ["layer1"]})
    assert not any(n.startswith("layer1.") for n in module.trainable_at(99))
    assert "layer2.0.conv1.weight" in module.trainable_at(99)


def test_milestones_without_gradual_are_an_error():
    with pytest.raises(UserError, match="finetune.milestones: only finetune.strategy=gradual uses them"):
        ClassifierModule("resnet18", 3, finetune={"strategy": "full", "milestones": [2]})


def _lrs(module) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in module._build_optimizer().param_groups}


def test_lr_decay_gives_each_block_the_lr_above_times_the_factor():
    module = ClassifierModule("resnet18", 3, finetune={"lr_decay": 0.3},
                              optim={"lr": 0.1, "weight_decay": 0.0})
    lrs = _lrs(module)
    expected = {"head": 0.1, "layer4": 0.03, "layer3": 0.009, "layer2": 0.0027, "layer1": 0.00081,
                "conv1+bn1": 0.000243}
    assert lrs.keys() == expected.keys()
    assert all(math.isclose(lrs[k], v) for k, v in expected.items())


def test_lr_decay_refines_explicit_groups_from_their_own_lr():
    groups = [{"name": "body", "patterns": ["@body"], "lr_scale": 0.1},
              {"name": "neck", "patterns": ["@neck"], "lr_scale": 0.5},
              {"name": "head", "patterns": ["@head"]}]
    module = ClassifierModule("resnet18", 3, finetune={"lr_decay": 0.5},
                              optim={"lr": 1.0, "weight_decay": 0.0, "groups": groups, "rest": "freeze"})
    lrs = _lrs(module)
    assert lrs == {"body:layer3": 0.1, "body:layer2": 0.05, "body:layer1": 0.025, "body:conv1+bn1": 0.0125,
                   "neck": 0.5, "head": 1.0}


def test_bad_lr_decay_is_an_error():
    with pytest.raises(UserError, match=r"finetune.lr_decay=1.5: give a factor in \(0, 1\]"):
        ClassifierModule("resnet18", 3, finetune={"lr_decay": 1.5})


def test_no_weight_decay_on_norm_weights_and_biases():
    module = ClassifierModule("resnet18", 3, optim={"lr": 0.1, "weight_decay": 1e-4})
    groups = {g["name"]: g for g in module._build_optimizer().param_groups}
    assert set(groups) == {"default", "default:no_decay"}
    names = {id(p): n for n, p in module.net.named_parameters()}
    no_decay = {names[id(p)] for p in groups["default:no_decay"]["params"]}
    assert groups["default:no_decay"]["weight_decay"] == 0 and groups["default"]["weight_decay"] == 1e-4
    assert {"bn1.weight", "bn1.bias", "fc.bias", "layer1.0.bn2.weight"} <= no_decay
    assert not any(n.endswith("conv1.weight") or n == "fc.weight" for n in no_decay)
    off = ClassifierModule("resnet18", 3, optim={"lr": 0.1, "weight_decay": 1e-4, "no_decay_norm_bias": False})
    assert [g["name"] for g in off._build_optimizer().param_groups] == ["default"]


def test_frozen_parameters_get_no_update_decay_or_momentum():
    """One real optimizer step with weight decay and momentum on a gradual plan at epoch 0."""
    module = ClassifierModule("resnet18", 3, finetune={"strategy": "gradual", "milestones": [1]},
                              optim={"lr": 0.5, "momentum": 0.9, "weight_decay": 0.1})
    optimizer = module._build_optimizer()
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    module.train()
    for _ in range(2):
        optimizer.zero_grad()
        module.criterion(module(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
    after = module.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # no BatchNorm statistics either
    frozen = [p for n, p in module.net.named_parameters() if not n.startswith("fc.")]
    assert all(p.grad is None and p not in optimizer.state for p in frozen)


@pytest.mark.parametrize("preset, strategy, trainable_at_start, lrs", [
    ("small_similar", "feature_extractor", {"fc"}, {"default": 0.02}),
    ("small_different", "partial", {"fc", "layer3", "layer4"}, {"head": 0.02, "layer4": 0.01, "layer3": 0.005}),
    ("large_similar", "gradual", {"fc"}, {"head": 0.02, "layer4": 0.006, "layer3": 0.0018}),
    ("large_different", "gradual", {"fc"}, {"head": 0.02, "layer4": 0.016, "layer3": 0.0128}),
])
def test_presets_do_what_the_readme_table_says(tmp_path, preset, strategy, trainable_at_start, lrs):
    from conftest import compose_train

    from lightning_project.utils.config import plain

    cfg = compose_train([f"finetune={preset}"], tmp_path)
    module = ClassifierModule("resnet18", 3, finetune=plain(cfg.finetune), optim=plain(cfg.optim))
    assert cfg.finetune.strategy == strategy
    assert {n.split(".")[0] for n, p in module.net.named_parameters() if p.requires_grad} == trainable_at_start
    if strategy == "gradual":  # one head-only epoch, then everything
        assert [m for m, _, _ in module.unfreeze_plan] == [1]
        assert module.trainable_at(1) == {n for n, _ in module.net.named_parameters()}
    got = _lrs(module)
    for name, lr in lrs.items():
        assert got[name] == pytest.approx(lr), name
