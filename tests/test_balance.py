"""Class imbalance and mixing: the balanced sampler, class weights, MixUp/CutMix targets, and a run
that uses them all on an unbalanced image folder, read back from its outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_train, make_image_folder
from sklearn.utils.class_weight import compute_class_weight

from lightning_project.data import mixing, sampling
from lightning_project.errors import UserError
from lightning_project.models import ClassifierModule

LABELS = np.array([0] * 90 + [1] * 9 + [2] * 1)


@pytest.mark.parametrize("mode, shares", [("balanced", (1 / 3, 1 / 3, 1 / 3)), ("sqrt", (0.703, 0.222, 0.074))])
def test_sampler_draws_classes_by_the_chosen_weights(mode, shares):
    sampler = sampling.class_sampler(LABELS, 3, mode, torch.Generator().manual_seed(0))
    assert len(sampler) == len(LABELS)
    draws = np.concatenate([LABELS[list(sampler)] for _ in range(100)])
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), shares, atol=0.02)


def test_class_weights_keep_the_loss_scale():
    counts = np.bincount(LABELS)
    balanced = sampling.class_weights(counts, "auto")
    np.testing.assert_allclose(balanced, compute_class_weight("balanced", classes=np.arange(3), y=LABELS))
    for mode in ("balanced", "sqrt"):
        weights = np.asarray(sampling.class_weights(counts, mode))
        assert weights[2] > weights[1] > weights[0]
        assert np.isclose((weights * counts).sum() / counts.sum(), 1.0)  # mean weight per sample is 1
    assert sampling.class_weights(counts, [1, 2, 3]) == [1.0, 2.0, 3.0]
    with pytest.raises(UserError, match=r"loss.class_weights=\[1.0, 2.0\]: give 3 non-negative weights"):
        sampling.class_weights(counts, [1, 2])
    with pytest.raises(UserError, match="loss.class_weights='inverse': choose balanced"):
        sampling.class_weights(counts, "inverse")
    with pytest.raises(UserError, match="data.sampler='weighted': choose balanced"):
        sampling.check_sampler("weighted")


def test_mixer_gives_probability_targets_and_checks_its_values():
    samples = [(torch.rand(3, 8, 8), torch.tensor(i % 4)) for i in range(8)]
    for kwargs in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}):
        x, y = mixing.mixer(4, **kwargs)(samples)
        assert x.shape == (8, 3, 8, 8) and y.shape == (8, 4)
        assert torch.allclose(y.sum(dim=1), torch.ones(8)) and (y > 0).sum(dim=1).max() <= 2
    torch.manual_seed(0)
    plain = [mixing.mixer(4, mixup_alpha=0.4, prob=0.3)(samples)[1] for _ in range(200)]
    one_hot = sum(bool(((t == 0) | (t == 1)).all()) for t in plain)
    assert 110 < one_hot < 170  # about 70% of batches left unmixed (one-hot targets)
    assert mixing.mixer(4) is None
    with pytest.raises(UserError, match=r"augment.mixup_alpha=-0.2: must be >= 0"):
        mixing.mixer(4, mixup_alpha=-0.2)
    with pytest.raises(UserError, match=r"augment.mix_prob=0: must be in \(0, 1\]"):
        mixing.mixer(4, cutmix_alpha=1.0, prob=0)


def test_soft_targets_train_and_count_the_dominant_class():
    module = ClassifierModule("resnet18", num_classes=3, class_weights=[1.0, 2.0, 3.0], optim={"lr": 0.1})
    x = torch.randn(4, 3, 32, 32)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [1.0, 0.0, 0.0], [0.2, 0.8, 0.0]])
    loss, logits = module._step((x, soft), module.train_metrics, module.criterion)
    loss.backward()
    assert torch.isfinite(loss)
    accuracy = module.train_metrics["acc"].compute()
    assert accuracy == (logits.argmax(1) == torch.tensor([0, 2, 0, 1])).float().mean()
    plain = module.eval_criterion(logits, soft.argmax(1))
    weighted = module.criterion(logits, soft.argmax(1))
    assert not torch.isclose(plain, weighted)  # weights shape the training loss only


@pytest.fixture(scope="module")
def unbalanced_run(tmp_path_factory):
    """One short run on an unbalanced folder with the balanced sampler, class weights and MixUp."""
    from lightning_project.train import train

    tmp = tmp_path_factory.mktemp("unbalanced")
    root = make_image_folder(tmp / "imgs", ("common",), per_class=30)
    make_image_folder(root, ("rare", "mid"), per_class=6, seed=2)
    run = tmp / "run"
    cfg = compose_train(["data=imagefolder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
                         "data.batch_size=8", "data.val_fraction=0.25", "data.test_fraction=0.25",
                         "data.sampler=balanced", "loss.class_weights=auto", "augment.mixup_alpha=0.2",
                         "model.pretrained=false", "trainer=cpu", "trainer.max_epochs=1", "logger=csv",
                         "trainer.enable_progress_bar=false"], run)
    train(cfg)
    return run


def test_the_run_reports_per_class_metrics_and_the_class_map(unbalanced_run):
    metrics = json.loads((unbalanced_run / "metrics.json").read_text())
    per_class = metrics["per_class"]
    assert list(per_class) == ["common", "mid", "rare"]
    support = {c: row["support"] for c, row in per_class.items()}
    assert support["common"] == 8 and support["mid"] + support["rare"] == 3  # the test split, stratified
    for row in per_class.values():
        assert set(row) == {"precision", "recall", "f1", "support"} and 0 <= row["f1"] <= 1
    classes = json.loads((unbalanced_run / "classes.json").read_text())
    assert classes["class_to_idx"] == {"common": 0, "mid": 1, "rare": 2}
    train_counts = classes["counts"]["train"]
    assert train_counts["common"] >= 14 and train_counts["mid"] == train_counts["rare"] == 3
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True, map_location="cpu")
    assert checkpoint["lightning_project"]["classes"] == classes
    n = sum(train_counts.values())
    expected = [n / (3 * c) for c in train_counts.values()]  # scikit-learn's "balanced"
    assert checkpoint["hyper_parameters"]["class_weights"] == pytest.approx(expected)
    assert checkpoint["datamodule_hyper_parameters"]["sampler"] == "balanced"
    assert not any(k.startswith("criterion.") for k in checkpoint["state_dict"])  # weights_path stays usable
    assert (unbalanced_run / "confusion_matrix.png").stat().st_size > 5000


def test_tune_initial_loss_reads_mixed_batches(tmp_path):
    from lightning_project.models.backbones import normalization
    from lightning_project.train import build_datamodule, build_module
    from lightning_project.tune import build_fabric
    from lightning_project.tuning import checks
    from lightning_project.tuning.options import InitialLoss

    cfg = compose_train(["augment.mixup_alpha=0.4", "augment.cutmix_alpha=1.0", "model.pretrained=false",
                         "trainer=cpu", "data.batch_size=8"], tmp_path, name="tune")
    mean, std = normalization(cfg.model.name, cfg.model.weights)
    datamodule = build_datamodule(cfg, mean, std)
    module = build_module(cfg, datamodule, mean, std)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert y.shape == (8, 10) and y.dtype == torch.float32
    check = checks.initial_loss(build_fabric(cfg), module, datamodule.train_dataloader(), InitialLoss(batches=2))
    assert check.details["images"] == 16 and np.isfinite(check.value)
