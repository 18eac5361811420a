"""hparams_search=optuna|random: the Hydra Optuna sweeper, made resumable and tolerant of failed trials.

The plugin (hydra-optuna-sweeper 1.2) gives the search-space syntax (`tag(log, interval(1e-4, 1e-1))`,
`choice(...)`), the samplers and the study storage; we keep all of that and replace its sweep loop,
which has three gaps:
- rerun against the same storage, it loads the study but numbers its jobs from 0 again (run
  directories 0, 1, ... are reused) and runs `n_trials` more; here a job's number is its trial's
  number, trials a kill left RUNNING are marked failed, and only the missing trials run;
- the first failed trial (an exception, or no finite value) stops the whole sweep; here it is told to
  Optuna as FAIL (train.py records why in the run's failure.json) and the sweep goes on;
- a study without one completed trial crashes at the end asking for the best one.
`direction` also takes our optimized_mode (max | min). Hydra finds sweepers only in the `hydra_plugins`
namespace: hydra_plugins/lightning_project_sweeper/ holds the class the config names, which runs this.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

log = logging.getLogger("lightning_project")
DIRECTIONS = {"max": "maximize", "min": "minimize"}
KILLED = "killed_trials"  # study attribute: numbers of the trials a killed sweep left running


def trial_value(job: Any) -> float | None:
    """A job's objective, or None when the run failed or gave no finite number."""
    try:
        value = float(job.return_value)  # re-raises the job's exception if it failed
    except Exception as e:  # noqa: BLE001 - every failure of a trial is the trial's, not the sweep's
        log.warning("trial failed: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return value if math.isfinite(value) else None


class ResumableSweeperImpl(OptunaSweeperImpl):
    def _study(self) -> optuna.Study:
        if isinstance(self.storage, str) and self.storage.startswith("sqlite:///"):
            Path(self.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        directions = [DIRECTIONS.get(d, d) for d in self._get_directions()]
        if len(directions) != 1:
            raise ValueError(f"hydra.sweeper.direction={directions}: one objective (optimized_metric) is optimised")
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    direction=directions[0], load_if_exists=True)
        killed = [t.number for t in study.trials if t.state == TrialState.RUNNING]  # they will never report
        for number in killed:
            study.tell(number, state=TrialState.FAIL)
            log.info("trial %d was cut short by a kill: marked failed; a new trial takes its place", number)
        if killed:
            study.set_user_attr(KILLED, study.user_attrs.get(KILLED, []) + killed)
        return study

    def sweep(self, arguments: list[str]) -> None:
        if getattr(self.sampler, "func", None) is optuna.samplers.GridSampler:
            raise ValueError("GridSampler: for a grid, run a plain multirun (train -m optim.lr=1e-3,1e-2 ...)")
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        for name in fixed:
            space.pop(name, None)
        study = self._study()
        killed = set(study.user_attrs.get(KILLED, []))
        finished = [t for t in study.trials if t.state.is_finished() and t.number not in killed]
        to_go = self.n_trials - len(finished)
        log.info("study %s in %s: %d trials done, %d to go", study.study_name, self.storage, len(finished),
                 max(to_go, 0))
        while to_go > 0:
            trials = [study.ask() for _ in range(min(to_go, self.n_jobs))]
            overrides = self._configure_trials(trials, space, fixed)
            # each run directory is named by its trial's number: unique across reruns of the sweep
            jobs = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            for trial, job in zip(trials, jobs):
                value = trial_value(job)
                if value is None:
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, value)
            to_go -= len(trials)
        self._save_results(study)

    def _save_results(self, study: optuna.Study) -> None:
        completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
        failed = sum(t.state == TrialState.FAIL for t in study.trials)
        if not completed:
            log.warning("no trial of study %s completed (%d failed): see failure.json in the run directories",
                        study.study_name, failed)
            return
        best = study.best_trial
        log.info("best trial %d: %s = %s with %s", best.number, self.config.get("optimized_metric"), best.value,
                 best.params)
        results = {"name": "optuna", "study": study.study_name, "best_trial": best.number, "best_value": best.value,
                   "best_params": best.params, "completed": len(completed), "failed": failed}
        OmegaConf.save(OmegaConf.create(results), Path(self.config.hydra.sweep.dir) / "optimization_results.yaml")
