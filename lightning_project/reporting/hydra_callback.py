"""The sweep report at the end of every multirun, as a Hydra callback (registered in conf/hydra/default.yaml):

    callbacks:
      sweep_report:
        _target_: lightning_project.reporting.hydra_callback.SweepReport
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightning_project.reporting.sweep import show, write_report
from lightning_project.utils import runtime

log = logging.getLogger("lightning_project")


class SweepReport(Callback):
    def __init__(self, top: int = 5) -> None:
        self.top = top

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = report = None
        try:
            sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
            if not sweep_dir:
                raise ValueError("the config has no hydra.sweep.dir")
            report = write_report(sweep_dir, where="hydra.sweep.dir")
            show(report, runtime.console(), self.top)
        except Exception as e:  # the runs are done and saved: a failed report must not make the sweep fail
            log.warning("sweep report not written (%s: %s); the runs are intact, write it with "
                        "`python -m lightning_project.report %s`", type(e).__name__, e, sweep_dir or "SWEEP_DIR")
        if report is not None and report.best is None:  # nothing came of the sweep: scripts must not see success
            print(f"error: no run of the sweep in {sweep_dir} completed; their errors are in sweep_summary.csv",
                  file=sys.stderr, flush=True)
            sys.exit(1)
