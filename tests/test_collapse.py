"""Collapse detection: predictions that collapse to one class are reported (and can stop training).

Unit tests drive the callback's hooks with synthetic batches and a stand-in trainer; end-to-end
runs of the real training function force a collapse with an absurd learning rate, and check a
healthy run stays silent.
"""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_train
from pytorch_lightning.trainer.states import TrainerFn

from lightning_project.callbacks import CollapseDetector
from lightning_project.train import train

LOGGER = "lightning_project.callbacks.collapse"
NAMES = ["cat", "dog", "fox", "owl"]


class FakeStrategy:
    """`reduce` as on one process, or as if `copies` identical processes summed their counts."""

    def __init__(self, copies: int = 1):
        self.copies = copies
        self.ops: list[str] = []

    def reduce(self, tensor, reduce_op="mean"):
        self.ops.append(reduce_op)
        return tensor * self.copies if reduce_op == "sum" else tensor


def fake_trainer(copies: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.FITTING), sanity_checking=False, strategy=FakeStrategy(copies),
        is_global_zero=True, current_epoch=0, should_stop=False, callback_metrics={},
    )


class FakeModule:
    def __init__(self, names=NAMES):
        self.hparams = {"num_classes": len(names), "class_names": list(names)}
        self.device = torch.device("cpu")
        self.logged: list[tuple[str, float]] = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, float(value)))


def epoch(cb, trainer, module, preds, targets, batch_size=10, val_loss=1.0):
    """One validation epoch through the callback's hooks, in batches, then the next epoch number."""
    preds, targets = torch.as_tensor(preds), torch.as_tensor(targets)
    cb.on_validation_epoch_start(trainer, module)
    for i, start in enumerate(range(0, len(preds), batch_size)):
        y = targets[start : start + batch_size]
        cb.on_validation_batch_end(trainer, module, preds[start : start + batch_size], (torch.zeros(len(y), 3), y), i)
    cb.on_validation_epoch_end(trainer, module)
    trainer.callback_metrics = {"val/loss": torch.tensor(val_loss)}
    cb.on_validation_end(trainer, module)
    trainer.current_epoch += 1


BALANCED = [c for c in range(4) for _ in range(10)]  # 40 labels, 10 per class
GOOD = [c if i % 5 else (c + 1) % 4 for i, c in enumerate(BALANCED)]  # 80% right, spread over classes


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_one_class_for_patience_epochs_warns_once_with_the_histogram(caplog):
    cb, trainer, module = CollapseDetector(patience=2), fake_trainer(), FakeModule()
    collapsed = [0] + [2] * 39  # one 'cat' (right), 39 'fox'
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        epoch(cb, trainer, module, collapsed, BALANCED)
        assert cb.streak == 1 and not warnings_of(caplog)  # one epoch is not a streak yet
        epoch(cb, trainer, module, collapsed, BALANCED, val_loss=float("nan"))
        epoch(cb, trainer, module, collapsed, BALANCED)
    (message,) = warnings_of(caplog)  # once per streak, not every epoch
    assert message.startswith("prediction collapse at epoch 1, 2 validation epochs in a row: ")
    assert "98% of the 40 validation predictions are class 'fox'" in message
    assert "val/acc 0.275 (majority-class rate 0.250)" in message  # 10 'fox' right + the 'cat' one
    assert "predicted classes: 'fox': 39 (98%), 'cat': 1 (2%)" in message
    assert "val/loss is nan: the weights diverged" in message
    assert "lower optim.lr" in message and "python -m lightning_project.tune" in message
    assert "data.batch_size" in message and "labels" in message
    assert "training goes on" in message and not trainer.should_stop
    assert [e["epoch"] for e in cb.events] == [0, 1, 2] and cb.streak == 3
    first = cb.events[0]
    assert first["reason"] == "one_class" and first["top_class"] == 2 and first["top_name"] == "fox"
    assert first["share"] == pytest.approx(39 / 40) and first["acc"] == pytest.approx(11 / 40)
    assert first["majority_rate"] == pytest.approx(0.25) and first["histogram"] == {"cat": 1, "fox": 39}
    assert math.isnan(cb.events[1]["val_loss"]) and first["val_loss"] == pytest.approx(1.0)
    assert module.logged == [("val/top_pred_share", pytest.approx(39 / 40))] * 3


def test_stop_true_stops_training_when_the_streak_reaches_patience(caplog):
    cb, trainer, module = CollapseDetector(patience=2, stop=True), fake_trainer(), FakeModule()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        epoch(cb, trainer, module, [1] * 40, BALANCED)
        assert not trainer.should_stop
        epoch(cb, trainer, module, [1] * 40, BALANCED)
    assert trainer.should_stop
    (message,) = warnings_of(caplog)
    assert "100% of the 40 validation predictions are class 'dog'" in message
    assert message.endswith("stopping training (stop=true)")


def test_healthy_epoch_ends_the_streak_and_a_new_streak_warns_again(caplog):
    cb, trainer, module = CollapseDetector(patience=2), fake_trainer(), FakeModule()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for preds in ([0] * 40, GOOD, [0] * 40, GOOD, [3] * 40, [3] * 40, [3] * 40, GOOD, [1] * 40, [1] * 40):
            epoch(cb, trainer, module, preds, BALANCED)
    messages = warnings_of(caplog)
    assert [m.split(",")[0] for m in messages] == ["prediction collapse at epoch 5", "prediction collapse at epoch 9"]
    assert "class 'owl'" in messages[0] and "class 'dog'" in messages[1]
    assert [e["epoch"] for e in cb.events] == [0, 2, 4, 5, 6, 8, 9]
    assert [share for _, share in module.logged][:2] == [1.0, 0.25]  # GOOD: 10 answers of each class


def test_accuracy_at_the_majority_rate_counts_even_with_spread_predictions(caplog):
    # 70% 'cat' in the labels; predictions spread ('cat' 80%), right exactly as often as always-'cat'
    targets = [0] * 28 + [1] * 4 + [2] * 4 + [3] * 4
    preds = [0] * 24 + [1] * 4 + [1] * 4 + [0] * 4 + [0] * 4  # 24 'cat' + 4 'dog' right: acc 0.7
    cb, trainer, module = CollapseDetector(patience=1), fake_trainer(), FakeModule()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        epoch(cb, trainer, module, preds, targets)
    event = cb.events[0]
    assert event["reason"] == "majority_rate" and event["share"] == pytest.approx(0.8)
    assert event["acc"] == pytest.approx(0.7) and event["majority_rate"] == pytest.approx(0.7)
    (message,) = warnings_of(caplog)
    assert "val/acc 0.700 equals the majority-class rate 0.700: no better than always answering" in message
    assert "predicted classes: 'cat': 32 (80%), 'dog': 8 (20%)" in message


def test_an_imbalanced_but_good_model_is_not_a_collapse(caplog):
    # 96% 'cat' in the labels: a good model answers 'cat' about as often, and is right more often
    targets = [0] * 96 + [1] * 4
    preds = [0] * 96 + [1] * 3 + [0]  # 97% 'cat', acc 0.99 (above the 0.96 always-'cat' score)
    cb, trainer, module = CollapseDetector(patience=1), fake_trainer(), FakeModule()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        epoch(cb, trainer, module, preds, targets)
        assert not cb.events and not warnings_of(caplog)
        epoch(cb, trainer, module, [0] * 100, targets)  # always 'cat': acc 0.96, the majority rate
    assert [e["reason"] for e in cb.events] == ["majority_rate"] and len(warnings_of(caplog)) == 1


def test_sanity_check_small_epochs_and_validate_are_not_judged(caplog):
    cb, trainer, module = CollapseDetector(patience=1, min_samples=20), fake_trainer(), FakeModule()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer.sanity_checking = True
        epoch(cb, trainer, module, [0] * 40, BALANCED)
        trainer.sanity_checking = False
        epoch(cb, trainer, module, [0] * 19, BALANCED[:19])  # fewer than min_samples
        trainer.state.fn = TrainerFn.VALIDATING
        epoch(cb, trainer, module, [0] * 40, BALANCED)
    assert cb.checked == 0 and not cb.events and not warnings_of(caplog)
    assert [n for n, _ in module.logged] == ["val/top_pred_share"]  # the small epoch is still logged


def test_counts_are_summed_over_processes():
    # two processes each seeing the same 15 predictions: 30 in all, over min_samples=20
    cb, trainer, module = CollapseDetector(patience=1, min_samples=20), fake_trainer(copies=2), FakeModule()
    epoch(cb, trainer, module, [1] * 15, BALANCED[:15])
    assert "sum" in trainer.strategy.ops
    assert cb.events[0]["samples"] == 30 and cb.events[0]["histogram"] == {"dog": 30}


def test_logits_and_unknown_class_counts_are_accepted():
    cb, trainer, module = CollapseDetector(patience=1), fake_trainer(), FakeModule()
    module.hparams = {}  # no class names: indices, counts grow to the largest class seen
    logits = torch.zeros(30, 6)
    logits[:, 5] = 1.0
    epoch(cb, trainer, module, logits, [c % 6 for c in range(30)])
    event = cb.events[0]
    assert event["top_class"] == 5 and event["top_name"] == "5" and event["histogram"] == {"5": 30}
    assert event["acc"] == pytest.approx(5 / 30)


def test_a_module_without_predictions_turns_it_off_with_one_warning(caplog):
    cb, trainer, module = CollapseDetector(patience=1), fake_trainer(), FakeModule()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(2):
            cb.on_validation_epoch_start(trainer, module)
            cb.on_validation_batch_end(trainer, module, {"loss": torch.tensor(1.0)}, (torch.zeros(2), torch.zeros(2)), 0)
            cb.on_validation_epoch_end(trainer, module)
            cb.on_validation_end(trainer, module)
    (message,) = warnings_of(caplog)
    assert "CollapseDetector is off" in message and "dict" in message
    assert cb.checked == 0 and not module.logged


def test_state_survives_a_resume_but_a_later_test_does_not_roll_it_back():
    cb, trainer, module = CollapseDetector(patience=3), fake_trainer(), FakeModule()
    epoch(cb, trainer, module, [0] * 40, BALANCED)
    epoch(cb, trainer, module, [0] * 40, BALANCED)
    saved = json.loads(json.dumps(cb.state_dict()))  # plain values only (checkpoints load weights_only)
    resumed = CollapseDetector(patience=3)
    resumed.load_state_dict(saved)
    assert (resumed.streak, resumed.checked, len(resumed.events)) == (2, 2, 2)
    trainer2 = fake_trainer()
    trainer2.current_epoch = 2
    epoch(resumed, trainer2, module, [0] * 40, BALANCED)
    assert resumed.streak == 3 and resumed.warned  # the streak went on across the resume
    resumed.load_state_dict(saved)  # trainer.test(ckpt_path=best) after fit restores an older state
    assert resumed.streak == 3 and len(resumed.events) == 3


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"max_share": 0.0}, {"max_share": 1.5}, {"tolerance": 1.0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CollapseDetector(**kwargs)


def test_config_enables_it_warning_only_in_both_callback_sets(tmp_path):
    for option in ("default", "early_stopping"):
        node = compose_train([f"callbacks={option}"], tmp_path).callbacks.collapse_detector
        assert node._target_ == "lightning_project.callbacks.CollapseDetector"
        assert node.stop is False and node.patience == 3 and node.max_share == 0.95


# ---- end to end: the real training function --------------------------------------------------
TINY = ["model.pretrained=false", "logger=csv", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0",
        "data.image_size=16", "data.batch_size=16", "trainer.limit_train_batches=1", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=1", "test=false", "scheduler=none"]


def run(tmp_path, *overrides) -> dict:
    train(compose_train([*TINY, *overrides], tmp_path))
    return json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("stop", [False, True])
def test_an_absurd_learning_rate_collapses_and_is_reported(stop, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        report = run(tmp_path, "optim.lr=50", "trainer.max_epochs=3", "callbacks.collapse_detector.patience=2",
                     f"callbacks.collapse_detector.stop={str(stop).lower()}")
    (message,) = warnings_of(caplog)  # once, though every epoch collapsed
    assert message.startswith("prediction collapse at epoch 1, 2 validation epochs in a row: ")
    assert "100% of the 32 validation predictions are class" in message
    assert "val/loss is nan: the weights diverged" in message and "lower optim.lr" in message
    history = report["history"]
    assert [row["val/top_pred_share"] for row in history] == [1.0] * len(history)  # logged every epoch
    assert report["epochs"] == (2 if stop else 3)  # stopped after the second collapsed epoch
    assert message.endswith("stopping training (stop=true)" if stop else "training goes on (set stop=true to stop it)")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]
    events = state["CollapseDetector"]["events"]
    assert len(events) == report["epochs"] and {e["share"] for e in events} == {1.0}
    assert {e["reason"] for e in events} == {"one_class"} and math.isnan(events[-1]["val_loss"])


@pytest.mark.slow
def test_a_healthy_run_does_not_warn(tmp_path, caplog):
    # every epoch judged on its own (patience=1): not one is taken for a collapse
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        report = run(tmp_path, "optim=adam", "trainer.max_epochs=2", "trainer.limit_train_batches=8",
                     "callbacks.collapse_detector.patience=1")
    assert not warnings_of(caplog)
    shares = [row["val/top_pred_share"] for row in report["history"]]
    assert len(shares) == 2 and max(shares) < 0.8  # seen: 0.56, 0.38
    assert report["metrics"]["val/acc"] > 0.25  # it learns (seen: 0.41); chance is 0.1
