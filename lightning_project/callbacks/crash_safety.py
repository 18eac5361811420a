"""Nothing lost to a crash: atomic checkpoint files, a checkpoint on Ctrl-C/SIGTERM, a clear stop on NaN.

- `AtomicCheckpointIO` (a Lightning CheckpointIO plugin): each checkpoint is written to a temporary
  file beside its target, flushed to disk, then renamed over it. Lightning's own save goes through
  fsspec's transaction, whose temporary file is made by `tempfile.mkstemp()` in $TMPDIR: when that is
  another file system than the run directory (a tmpfs /tmp, a network home), the final "move" is a
  copy, and a kill during the copy leaves a truncated last.ckpt; it also holds the whole checkpoint
  in memory first. Here the rename is always within one directory (atomic on POSIX), the old file is
  untouched until the new one is complete, and a failed write (a full disk) leaves no partial file.
- `SaveOnInterrupt`: Lightning stops at the end of the current batch on Ctrl-C and on SIGTERM (the
  preemption signal), then calls `on_exception`; this saves checkpoints/last.ckpt there, so
  `resume=auto` continues. Lightning's OnExceptionCheckpoint saves on every exception, including a
  failed run with non-finite weights, under a name resume would not look for.
- `StopOnNonFiniteLoss`: the first non-finite training loss stops the run with the step, the
  learning rates at that step and the last good checkpoint, instead of training on NaNs.
- `RandomStateInCheckpoint`: the random generators' state travels in the checkpoint, so a resumed run
  draws the random numbers the uninterrupted run would have drawn.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from pathlib import Path

import numpy as np

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_project.errors import UserError

log = logging.getLogger("lightning_project")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `<name>.tmp-<pid>` in the target's folder, fsync, then os.replace onto the target."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException as e:
            temporary.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"no space left on the device of {path.parent} while saving {path.name}; free "
                                f"space (the previous {path.name} is intact) or set paths.log_dir elsewhere") from None
            raise
        try:  # the rename itself survives a power cut once the directory entry is on disk
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # some file systems refuse fsync on directories; the rename is still atomic
            pass


class SaveOnInterrupt(pl.Callback):
    """Ctrl-C or SIGTERM during fit: save `<dirpath>/last.ckpt` (the newest state) before exiting."""

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.state.fn != "fit":
            return
        what = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        self.saved = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(self.saved)  # every rank calls it (Lightning writes on rank 0)
        if trainer.is_global_zero:
            log.warning("%s at epoch %d, step %d: saved %s; rerun the same command with resume=auto (same "
                        "hydra.run.dir) to continue", what, trainer.current_epoch, trainer.global_step, self.saved)


class StopOnNonFiniteLoss(pl.Callback):
    """Raise a UserError naming the first training step whose loss is NaN or infinite.

    Reading the loss on the host every step (`float(loss)`) would make the CPU wait for the GPU at
    every step, and the GPU then idle while the next step is queued. Instead the first bad step is
    recorded on the device (`torch.where`, no transfer) and read on the steps where Lightning writes
    to the loggers (`trainer.log_every_n_steps`, which read values anyway), or every
    `check_every_n_steps` if set, at the last batch of an epoch, and before any validation or
    checkpoint sees the weights, so no checkpoint holds them. The step, epoch, batch and learning rates
    of the recorded step come from a host-side log of the steps since the last read: the message is
    the one a per-step check would give; the steps in between trained on NaNs that nothing keeps.
    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise UserError(f"callbacks.stop_on_nan.check_every_n_steps={check_every_n_steps}: must be >= 1 or null")
        self.check_every_n_steps = check_every_n_steps
        self._first_bad: torch.Tensor | None = None  # [index into _pending, loss] of the first bad step; -1: none
        self._pending: list[tuple[int, int, int, dict]] = []  # (step, epoch, batch, lrs) since the last read

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        lrs = {g.get("name", str(i)): f"{g['lr']:.3g}" for opt in trainer.optimizers
               for i, g in enumerate(opt.param_groups)}
        self._pending.append((trainer.global_step, trainer.current_epoch, batch_idx, lrs))
        loss = loss.detach().float()
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.tensor([-1.0, 0.0], device=loss.device)
        new = ~torch.isfinite(loss) & (self._first_bad[0] < 0)
        here = torch.stack([torch.full_like(loss, len(self._pending) - 1), loss])
        self._first_bad = torch.where(new, here, self._first_bad)
        if self.check_every_n_steps is not None:
            due = len(self._pending) >= self.check_every_n_steps
        else:  # Lightning's own test for "write the step values now" (also used by its LearningRateMonitor)
            due = getattr(trainer._logger_connector, "should_update_logs", True)
        if due or batch_idx + 1 >= trainer.num_training_batches:
            self._check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._check(trainer)  # raising here keeps the NaN weights out of the file

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        if not self._pending or self._first_bad is None:
            return
        index, value = self._first_bad.tolist()  # the one read from the device
        pending, self._pending = self._pending, []
        self._first_bad.fill_(-1.0)
        if index < 0:
            return
        step, epoch, batch_idx, lrs = pending[int(index)]
        last = next((c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks
                     if getattr(c, "last_model_path", None) or getattr(c, "best_model_path", None)), None)
        raise UserError(
            f"train/loss is {value} at step {step} (epoch {epoch}, batch {batch_idx}) "
            f"with learning rates {lrs}; last good checkpoint: {last or 'none yet'}. Lower optim.lr (python -m "
            "lightning_project.tune finds one), set trainer.gradient_clip_val, or check the data"
        )


class RandomStateInCheckpoint(pl.Callback):
    """Saves the random number generators' state in every checkpoint and restores it on resume.

    Lightning restores weights, optimizer, schedule and loop counters, but not the random state: a
    resumed run would shuffle, augment, mix and drop out differently from the run it continues. With
    it (and trainer.deterministic=true, data.num_workers=0 or non-persistent workers) a run resumed
    from an end-of-epoch checkpoint repeats the uninterrupted run exactly. Stored as tensors and
    plain values, so checkpoints still load with weights_only=True.
    """

    def state_dict(self) -> dict:
        name, keys, position, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position,
                                                        has_gauss, gauss], "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
