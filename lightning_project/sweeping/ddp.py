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
the sweep goes on, and a job whose extra process died waits at most 10 minutes for it (`shorten_timeout`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch
from hydra.core.hydra_config import HydraConfig
from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher, subprocess_script

log = logging.getLogger("lightning_project")
_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


class SweepJobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, with the command of one sweep job instead of the sweep's."""

    def __init__(self, launcher: _SubprocessScriptLauncher, entry: str) -> None:
        super().__init__(launcher.cluster_environment, launcher.num_processes, launcher.num_nodes)
        self.entry = entry  # the module the job runs (lightning_project.train)
        self._environment = {key: os.environ.get(key) for key in _ENVIRONMENT}
        self._threads = torch.get_num_threads()  # Lightning divides them among the processes

    def job_command(self, local_rank: int) -> tuple[list[str], str]:
        hydra = HydraConfig.get()
        sources = [f"--config-name={hydra.job.config_name}"]
        for source in hydra.runtime.config_sources:  # the primary config and any --config-dir the sweep had
            path = source.path if source.schema == "file" else f"{source.schema}://{source.path}"
            if source.provider == "main":
                sources.append(f"--config-path={path}")
            elif source.provider == "command-line":
                sources.append(f"--config-dir={path}")
        command = [sys.executable, "-m", self.entry, *sources, *hydra.overrides.task,
                   f'hydra.run.dir="{hydra.runtime.output_dir}"',
                   f"hydra.job.name={hydra.job.name}_ddp_rank{local_rank}", "hydra.output_subdir=null",
                   "hydra.mode=RUN"]
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
        and the thread count are what they were before the job."""
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
        torch.set_num_threads(self._threads)
        codes = [proc.returncode for proc in self.procs]
        if not failed and any(codes):
            log.warning("DDP processes of this run exited with %s", codes)


def shorten_timeout(strategy, minutes: float = 10.0) -> None:
    """A sweep job's process group waits at most `minutes` for a process that died (a crash at start, a
    lost node) instead of torch's 30 minutes: the job then fails and the sweep goes on. (Lightning's own
    child-process observer would SIGKILL the sweep instead.) A timeout the user set is kept."""
    from datetime import timedelta

    from torch.distributed.constants import default_pg_timeout

    if getattr(strategy, "_timeout", None) == default_pg_timeout:
        strategy._timeout = timedelta(minutes=minutes)
