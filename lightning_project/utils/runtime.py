"""Process set-up shared by the entry points: seed, matmul precision, one-line user errors."""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import warnings
from collections.abc import Iterator

import pytorch_lightning as pl
import torch
from rich.console import Console

from lightning_project.errors import UserError

log = logging.getLogger("lightning_project")


def quiet_library_noise() -> None:
    """Drop two messages that are noise for our users: Lightning's advertisement for its cloud
    logger, and a deprecation inside Lightning's own pytree helper that users cannot act on."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def console() -> Console:
    """Rich console; in logs and pipes wide enough that tables do not wrap."""
    return Console() if Console().is_terminal else Console(width=160)


def setup(seed: int | None, matmul_precision: str = "highest") -> None:
    quiet_library_noise()
    if matmul_precision not in ("highest", "high", "medium"):
        raise UserError(f"matmul_precision={matmul_precision!r}: choose highest, high (TF32) or medium")
    if seed is not None:
        pl.seed_everything(seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(matmul_precision)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report a UserError as one line on stderr and exit with status 2 (no traceback wall)."""
    try:
        yield
    except (UserError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.debug("user error", exc_info=True)
        message = str(e) if isinstance(e, UserError) else (
            f"no space left on the device while writing {e.filename or 'a file'}: free space, or set "
            "paths.log_dir (and hydra.run.dir) to a disk with room")
        if "Original Traceback" in message:  # raised in a loader worker, which prepends its traceback
            message = [line for line in message.splitlines() if line.strip()][-1].split("UserError: ", 1)[-1]
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


@contextlib.contextmanager
def out_of_memory(setting: str, fix: str) -> Iterator[None]:
    """Running out of memory (CUDA, MPS or the CPU allocator) as one line naming `setting` and the fix."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        text = str(e) or type(e).__name__
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and not any(
                s in text for s in ("out of memory", "can't allocate memory")):
            raise
        raise UserError(f"out of memory with {setting} ({text.splitlines()[0][:160]}); {fix}") from None
