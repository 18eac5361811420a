"""One run of a sweep: a failure is written into the run directory and the sweep goes on.

Hydra's basic sweeper re-raises a failed job's exception only after the whole batch, and the Optuna
sweeper stops at the first failure; our one-line user errors exit the process, ending any sweep at
once. Inside a multirun, a run that fails (a bad combination, a NaN loss, a crash) writes
`failure.json` (read by `report`), prints its one line (a crash also its traceback, to the log) and
returns NaN, which our sweeper tells Optuna as a failed trial. A stop by SIGTERM or Ctrl-C still ends
the sweep: that is the machine going away, not the trial failing.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from lightning_project.errors import Stopped, UserError

log = logging.getLogger("lightning_project")
FAILURE = "failure.json"  # {"status": "failed", "error", "epoch", "global_step", "seconds"}


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_trial(task: Callable[..., float | None], cfg: Any, out: Path) -> float | None:
    """`task(cfg, progress)`; in a multirun a failure is recorded and NaN returned instead of raised.
    `progress` is a dict the task fills: `trainer`, so the record can say where the run stopped, and
    `finish`, functions called with `failed` when the run is over (a sweep job's DDP processes)."""
    (out / FAILURE).unlink(missing_ok=True)  # a rerun (resume=auto) of a run that failed before
    progress: dict[str, Any] = {"finish": []}
    started = time.perf_counter()
    failed = True
    try:
        value = task(cfg, progress)
        failed = False
        return value
    except Stopped:
        raise
    except Exception as e:
        if not in_multirun():  # a single run: the error itself is the report
            raise
        trainer = progress.get("trainer")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # a user error's message is its first line; a crash re-raised from a worker ends with the real one
        error = lines[0] if isinstance(e, UserError) and lines else f"{type(e).__name__}: {lines[-1] if lines else ''}"
        record = {
            "status": "failed",
            "error": error,
            "epoch": getattr(trainer, "current_epoch", None),
            "global_step": getattr(trainer, "global_step", None),
            "seconds": round(time.perf_counter() - started, 3),
        }
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / FAILURE).write_text(json.dumps(record, indent=2) + "\n")
        except OSError:
            log.warning("could not write %s", out / FAILURE)
        if not isinstance(e, UserError):  # a crash: its traceback belongs in the run's log
            log.exception("run %s crashed", out)
        print(f"error: run {out.name} failed: {record['error']} (the sweep goes on; see {out / FAILURE})",
              file=sys.stderr, flush=True)
        return math.nan
    finally:
        for finish in progress["finish"]:
            finish(failed)
