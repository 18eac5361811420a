"""Per-epoch train and validation metrics, kept in memory and in checkpoints for curves.png.

Loggers write the same numbers, but in each logger's own format and only when one is
configured; this keeps one plain record whatever `logger=` says, and survives a resume.
"""

from __future__ import annotations

import pytorch_lightning as pl


class EpochHistory(pl.Callback):
    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # called after the epoch's validation, so both train/* and val/* of this epoch are there
        row = {"epoch": float(trainer.current_epoch)}
        for name, value in trainer.callback_metrics.items():
            if name.startswith(("train/", "val/")) and not name.endswith("_step"):
                row[name] = float(value)
        self.epochs.append(row)

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        # Resuming fills an empty record; testing a checkpoint after fit (trainer.test(ckpt_path=
        # "best")) restores callback states too, and must not roll back the epochs recorded since.
        if not self.epochs:
            self.epochs = list(state_dict.get("epochs", []))
