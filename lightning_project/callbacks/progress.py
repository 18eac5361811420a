"""A progress bar that shows the training loss without waiting for the GPU at every step.

Lightning converts every `self.log(..., prog_bar=True)` step value to a Python number at the end of
every batch (`_LoggerConnector.on_batch_end`), whether or not the bar redraws, and even with the bar
off: logging the step loss to the bar costs one device synchronisation per step. This bar keeps the
last step's loss as a tensor and reads it only when it redraws (every `refresh_rate` batches).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 10, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self._loss: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        if self._loss is not None and trainer.training:  # read once per redraw
            items["loss"] = f"{self._loss.item():.4g}"
        return items
