"""DDP inside a Hydra multirun: each sweep job starts its own DDP processes, and only for itself.

Lightning starts DDP's other processes by rerunning the command line (`sys.argv`, with
`hydra.run.dir` added). In a multirun that command is the whole sweep: every extra process would run
every job again (the failure lightning-hydra-template documents and leaves open). Here, inside a
multirun, the other processes run just this job, in RUN mode:

    python -m lightning_project.train <this job's overrides> hydra.run.dir=<this job's directory>
        hydra.mode=RUN hydra.output_subdir=null

with Lightning's own environment variables (MASTER_ADDR/PORT, LOCAL_RANK, WORLD_SIZE), so they
join rank 0 as in a single run. When the job ends, `finish` waits for them, destroys the process
group and puts the environment back, so the next job starts a new group on a new port (Lightning
would otherwise take LOCAL_RANK=0 in the environment for processes started by a cluster and start
none). Lightning's child-process observer is not started: on a child's non-zero exit it SIGKILLs the
main process, which here is the sweep; instead a failed job's remaining processes are stopped and
the sweep goes on.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch
from hydra.core.hydra_config import HydraConfig
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from pytorch_lightning.strategies.launchers import subprocess_script

log = logging.getLogger("lightning_project")
_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class SweepJobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, with the command of one sweep job instead of the sweep's."""

    def __init__(self, launcher: _SubprocessScriptLauncher, entry: str) -> None:
        super().__init__(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)
        self.entry = entry  # the module the job runs (lightning_project.train)
        self._environment = {key: os.environ.get(key) for key in _ENVIRONMENT}

    def job_command(self, local_rank: int) -> tuple[list[str], str]:
        hydra = HydraConfig.get()
        command = [sys.executable, "-m", self.entry, *hydra.overrides.task,
                   f"hydra.run.dir={hydra.runtime.output_dir}", f"hydra.job.name={hydra.job.name}_ddp_rank{local_rank}",
                   "hydra.output_subdir=null", "hydra.mode=RUN"]
        return command, hydra.runtime.cwd

    def launch(self, function, *args, trainer=None, **kwargs):
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            lightnings = subprocess_script._hydra_subprocess_cmd
            subprocess_script._hydra_subprocess_cmd = self.job_command  # what _call_children_scripts runs
            try:
                self._call_children_scripts()
            finally:
                subprocess_script._hydra_subprocess_cmd = lightnings
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def finish(self, failed: bool, timeout: float = 120.0) -> None:
        """After the job: its other processes end (stopped if it failed), the group goes, the environment
        is what it was before the job."""
        for proc in self.procs:
            try:
                proc.wait(timeout=5.0 if failed else timeout)
            except subprocess.TimeoutExpired:
                log.warning("DDP process %d of this run did not exit; stopping it", proc.pid)
                proc.kill()
                proc.wait()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in self._environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        codes = [proc.returncode for proc in self.procs]
        if not failed and any(codes):
            log.warning("DDP processes of this run exited with %s", codes)
