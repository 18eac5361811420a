"""A test-only callback, added with `+callbacks.probe._target_=probes.Probe +callbacks.probe.out=DIR`:
what trained and at which lr, per step and per epoch, and each process's weights per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch


class Probe(pl.Callback):
    def __init__(self, out: str, stop_after_epoch: int | None = None) -> None:
        self.stop_after_epoch = stop_after_epoch  # a run cut short, as if killed after that epoch's checkpoint
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.lrs: list[dict[str, float]] = []
        self.trainable: dict[int, list[str]] = {}

    def _save_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}_{tag}.pt")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._save_weights(trainer, pl_module, "start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})
        if batch_idx == 0:  # after on_train_epoch_start has set this epoch's trainable set
            self.trainable[trainer.current_epoch] = sorted(
                {n.split(".")[0] for n, p in pl_module.net.named_parameters() if p.requires_grad}
            )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save_weights(trainer, pl_module, f"epoch{trainer.current_epoch}")
        if trainer.current_epoch == self.stop_after_epoch:
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {"lrs": self.lrs, "trainable": self.trainable}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class MemoryProbe(pl.Callback):
    """The process's resident memory (RSS, from /proc) at the end of every `every`-th training epoch,
    written to `<out>/rss.json` ({epoch: bytes}) at the end of fit."""

    def __init__(self, out: str, every: int = 25) -> None:
        self.out, self.every = Path(out), every
        self.rss: dict[int, int] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import gc
        import os

        if (trainer.current_epoch + 1) % self.every:
            return
        gc.collect()  # what is still referenced, not garbage waiting for a collection (0.3 s: not every epoch)
        with open("/proc/self/statm") as f:
            self.rss[trainer.current_epoch + 1] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "rss.json").write_text(json.dumps(self.rss))


class ReadBackCounter(pl.Callback):
    """Counts, per training batch, the calls that read a tensor's value back to the host (on a GPU each
    one waits for the queued kernels: a synchronisation). Written to `out`/readbacks.json at the end."""

    READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.batch: int | None = None
        self.counts: dict[int, list[str]] = {}
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str, original):
        def read(tensor, *args, **kwargs):
            if self.batch is not None:
                self.counts.setdefault(self.batch, []).append(name)
            return original(tensor, *args, **kwargs)
        return read

    def on_train_start(self, trainer, pl_module) -> None:
        for name in self.READS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch_idx

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.batch = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self.batch = None

    def on_train_end(self, trainer, pl_module) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        (self.out / "readbacks.json").write_text(json.dumps(self.counts))


class MetricInputs(pl.Callback):
    """Records what the module's train_metrics are updated with, per epoch, and the accuracy of all of it:
    what train/acc must be when every update of the epoch (and nothing of earlier epochs) counts."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.correct: dict[int, list[int]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        update = pl_module.train_metrics.update

        def recording(preds, target, *args, **kwargs):
            hits = (preds.argmax(dim=1) == target).sum().item(), target.numel()
            totals = self.correct.setdefault(trainer.current_epoch, [0, 0])
            totals[0], totals[1] = totals[0] + hits[0], totals[1] + hits[1]
            return update(preds, target, *args, **kwargs)

        pl_module.train_metrics.update = recording

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out / "train_acc.json").write_text(json.dumps({e: c / n for e, (c, n) in self.correct.items()}))
