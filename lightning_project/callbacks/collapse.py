"""Collapse detection: the model predicts one class, whatever the image.

The symptom is validation accuracy stuck at the same value every epoch: the share of the one
class the model always answers (with balanced classes, chance). The usual causes are a learning
rate too high (the weights diverge, often to NaN), a batch too small for BatchNorm, or labels
that do not match the images. Lightning's callbacks see the metrics but not the predictions,
so this one counts the predicted and true classes of each validation epoch and says which.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

log = logging.getLogger(__name__)

SHARE_METRIC = "val/top_pred_share"  # logged every validation epoch: the most predicted class's share


class CollapseDetector(pl.Callback):
    """Warns (and optionally stops) when validation predictions collapse to one class.

    A validation epoch counts as collapsed when
    - one class takes at least `max_share` of the predictions, and `1 - max_share` more than its
      share of the labels (a class that is 97% of the data may be predicted 97% of the time), or
    - the accuracy equals the majority-class rate (within `tolerance`) and the labels hold more
      than one class: the model does no better than always answering the most frequent class.
    After `patience` collapsed validation epochs in a row it warns once, with the predicted-class
    histogram and the likely causes, and with `stop=True` it stops training. A healthy epoch
    ends the streak. Epochs with fewer than `min_samples` predictions are not judged.

    Needs `validation_step` to return the predicted classes (or the logits) of the batch, and
    the batch to be `(inputs, targets)`. Counts are summed over processes, so every process
    decides the same under DDP. Only `fit` is watched (not `trainer.validate`), and not the
    sanity check. The streak and the events survive a resume (they are in checkpoints).
    """

    def __init__(
        self,
        patience: int = 3,
        max_share: float = 0.95,
        tolerance: float = 0.01,
        min_samples: int = 20,
        stop: bool = False,
        log_share: bool = True,
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience={patience}: must be at least 1 (validation epochs)")
        if not 0.0 < max_share <= 1.0:
            raise ValueError(f"max_share={max_share}: must be in (0, 1]")
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance={tolerance}: must be in [0, 1)")
        self.patience = int(patience)
        self.max_share = float(max_share)
        self.tolerance = float(tolerance)
        self.min_samples = int(min_samples)
        self.stop = bool(stop)
        self.log_share = bool(log_share)
        # kept in checkpoints
        self.streak = 0  # collapsed validation epochs in a row
        self.warned = False  # this streak has been reported
        self.checked = 0  # validation epochs judged
        self.events: list[dict[str, Any]] = []  # one per collapsed epoch
        # this validation epoch
        self._pred: torch.Tensor | None = None
        self._true: torch.Tensor | None = None
        self._correct: torch.Tensor | int = 0
        self._stats: dict[str, Any] | None = None
        self._unusable = False

    # ---- counting ----------------------------------------------------------------------------
    @staticmethod
    def _watching(trainer: pl.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pred = self._true = None
        self._correct: torch.Tensor | int = 0
        self._stats = None

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._watching(trainer):
            return
        preds = outputs
        if isinstance(preds, torch.Tensor) and preds.is_floating_point() and preds.ndim == 2:
            preds = preds.argmax(dim=1)  # logits
        targets = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        if not (isinstance(preds, torch.Tensor) and preds.ndim == 1 and isinstance(targets, torch.Tensor)
                and targets.shape == preds.shape):
            if not self._unusable and trainer.is_global_zero:
                log.warning(
                    "CollapseDetector is off: validation_step must return the predicted classes of the batch "
                    "(a 1-D tensor) and batches must be (inputs, targets); got %s", type(outputs).__name__,
                )
            self._unusable = True
            return
        n = _num_classes(pl_module) or int(max(preds.max(), targets.max())) + 1
        pred = torch.bincount(preds.detach().long().flatten(), minlength=n)
        true = torch.bincount(targets.detach().long().flatten(), minlength=n)
        self._pred = _add(self._pred, pred)
        self._true = _add(self._true, true)
        self._correct = self._correct + (preds == targets).sum()  # a tensor: no device sync per batch

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._watching(trainer) or self._unusable:
            return
        device = pl_module.device
        empty = torch.zeros(0, dtype=torch.long, device=device)
        pred = self._pred.to(device) if self._pred is not None else empty
        true = self._true.to(device) if self._true is not None else empty
        correct = torch.as_tensor(self._correct, dtype=torch.long, device=device).reshape(1)
        # the same length on every process (a class seen by one only), then summed over processes
        size = int(trainer.strategy.reduce(torch.tensor(max(len(pred), len(true)), device=device), reduce_op="max"))
        local = torch.cat([_pad(pred, size), _pad(true, size), correct])
        total = trainer.strategy.reduce(local, reduce_op="sum").cpu()
        self._stats = _statistics(total[:size], total[size : 2 * size], int(total[-1]))
        if self._stats is not None and self.log_share:
            pl_module.log(SHARE_METRIC, self._stats["share"], on_step=False, on_epoch=True, sync_dist=True)

    # ---- judging -----------------------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the epoch's metrics are in trainer.callback_metrics (val/loss, for the diagnosis)
        stats, self._stats = self._stats, None
        if not self._watching(trainer) or stats is None or stats["samples"] < self.min_samples:
            return
        self.checked += 1
        reason = self.collapse_reason(stats)
        if reason is None:
            self.streak, self.warned = 0, False
            return
        self.streak += 1
        loss = trainer.callback_metrics.get("val/loss")
        event = {
            "epoch": int(trainer.current_epoch),
            "reason": reason,
            "top_class": stats["top_class"],
            "top_name": _class_name(pl_module, stats["top_class"]),
            "share": stats["share"],
            "acc": stats["acc"],
            "majority_rate": stats["majority_rate"],
            "samples": stats["samples"],
            "histogram": {_class_name(pl_module, c): n for c, n in enumerate(stats["pred"]) if n},
            "val_loss": float(loss) if loss is not None else None,
            "streak": self.streak,
        }
        self.events.append(event)
        if self.streak < self.patience:
            return
        if not self.warned and trainer.is_global_zero:
            log.warning(self.diagnosis(event, stats, pl_module))
        self.warned = True
        if self.stop:
            trainer.should_stop = True

    def collapse_reason(self, stats: dict[str, Any]) -> str | None:
        """'one_class', 'majority_rate' or None (healthy), for the statistics of one epoch."""
        # a class that really is 97% of the labels may be predicted 97% of the time
        label_share = stats["true"][stats["top_class"]] / stats["samples"]
        if stats["share"] >= self.max_share and stats["share"] >= label_share + (1.0 - self.max_share):
            return "one_class"
        # at chance level on balanced data acc also equals the majority rate: only a model leaning on
        # one class (half of the predictions or more) has collapsed rather than not yet learnt
        if (stats["classes_in_labels"] > 1 and stats["share"] >= 0.5
                and abs(stats["acc"] - stats["majority_rate"]) <= self.tolerance):
            return "majority_rate"
        return None

    def diagnosis(self, event: dict, stats: dict, pl_module: pl.LightningModule) -> str:
        """The one line a collapse is reported with."""
        name = event["top_name"]
        if event["reason"] == "one_class":
            what = (f"{event['share']:.0%} of the {event['samples']} validation predictions are class {name!r}, "
                    f"val/acc {event['acc']:.3f} (majority-class rate {event['majority_rate']:.3f})")
        else:
            what = (f"val/acc {event['acc']:.3f} equals the majority-class rate {event['majority_rate']:.3f}: "
                    f"no better than always answering the most frequent class")
        loss = event["val_loss"]
        diverged = f"; val/loss is {loss}: the weights diverged" if loss is not None and not math.isfinite(loss) else ""
        action = "stopping training (stop=true)" if self.stop else "training goes on (set stop=true to stop it)"
        return (
            f"prediction collapse at epoch {event['epoch']}, {self.streak} validation epochs in a row: {what}{diverged}; "
            f"predicted classes: {_histogram(stats['pred'], pl_module)}. Likely causes: a learning rate too high "
            f"(lower optim.lr, e.g. 10x, or find one with `python -m lightning_project.tune`), a batch too small "
            f"(raise data.batch_size), or labels that do not match the images (check the data); {action}"
        )

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"streak": self.streak, "warned": self.warned, "checked": self.checked, "events": self.events}

    def load_state_dict(self, state_dict: dict) -> None:
        # Resuming starts from the checkpoint's streak; testing a checkpoint after fit
        # (trainer.test(ckpt_path=best)) restores callback states too, and must not roll back this run's.
        if self.checked == 0 and not self.events:
            self.streak = int(state_dict.get("streak", 0))
            self.warned = bool(state_dict.get("warned", False))
            self.checked = int(state_dict.get("checked", 0))
            self.events = list(state_dict.get("events", []))


def _num_classes(pl_module: pl.LightningModule) -> int | None:
    hp = getattr(pl_module, "hparams", {}) or {}
    if hp.get("num_classes"):
        return int(hp["num_classes"])
    return len(hp["class_names"]) if hp.get("class_names") else None


def _class_name(pl_module: pl.LightningModule, index: int) -> str:
    names = (getattr(pl_module, "hparams", {}) or {}).get("class_names") or []
    return str(names[index]) if index < len(names) else str(index)


def _add(total: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    if total is None:
        return counts
    size = max(len(total), len(counts))
    return _pad(total, size) + _pad(counts, size)


def _pad(counts: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.pad(counts, (0, size - len(counts))) if len(counts) < size else counts


def _statistics(pred: torch.Tensor, true: torch.Tensor, correct: int) -> dict[str, Any] | None:
    """What the decision and the report need, from one epoch's predicted and true class counts
    and number of right answers (None for an epoch without predictions)."""
    samples = int(pred.sum())
    if samples == 0:
        return None
    top = int(pred.argmax())
    return {
        "pred": [int(v) for v in pred],
        "true": [int(v) for v in true],
        "samples": samples,
        "top_class": top,
        "share": float(pred[top]) / samples,
        "acc": correct / samples,
        "majority_rate": float(true.max()) / samples,
        "classes_in_labels": int((true > 0).sum()),
    }


def _histogram(pred: list[int], pl_module: pl.LightningModule, top: int = 5) -> str:
    total = sum(pred) or 1
    order = sorted((c for c, n in enumerate(pred) if n), key=lambda c: -pred[c])
    parts = [f"{_class_name(pl_module, c)!r}: {pred[c]} ({pred[c] / total:.0%})" for c in order[:top]]
    rest = sum(pred[c] for c in order[top:])
    if rest:
        parts.append(f"{len(order) - top} other classes: {rest}")
    return ", ".join(parts)
