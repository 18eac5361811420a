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
Also: a resumed study draws new configurations (the sampler is reseeded past the trials already made, else
it would repeat them); a trial a kill left RUNNING whose run had finished (a batch of n_jobs) is told its
value; a changed search space or direction is one line naming the key; `direction` takes our
optimized_mode (max | min). Hydra finds sweepers only in the `hydra_plugins`
namespace: hydra_plugins/lightning_project_sweeper/ holds the class the config names, which runs this.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from hydra.utils import instantiate
from optuna.distributions import check_distribution_compatibility
from optuna.trial import TrialState

from lightning_project.errors import UserError

log = logging.getLogger("lightning_project")
DIRECTIONS = {"max": "maximize", "min": "minimize"}
KILLED = "killed_trials"  # study attribute: numbers of the trials a killed sweep left running


def _finished_value(run_dir: Path) -> float | None:
    """The optimized value a run directory's metrics.json holds (None: the run did not finish)."""
    try:
        value = float(json.loads((run_dir / "metrics.json").read_text())["optimized_metric"]["value"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if math.isfinite(value) else None


def trial_value(job: Any) -> float | None:
    """A job's objective, or None when the run failed or gave no finite number."""
    try:
        value = float(job.return_value)  # re-raises the job's exception if it failed
    except Exception as e:  # noqa: BLE001 - every failure of a trial is the trial's, not the sweep's
        log.warning("trial failed: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return value if math.isfinite(value) else None


class ResumableSweeperImpl(OptunaSweeperImpl):
    def _study(self, space: dict) -> optuna.Study:
        if isinstance(self.storage, str) and self.storage.startswith("sqlite:///"):
            Path(self.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        directions = [DIRECTIONS.get(d, d) for d in self._get_directions()]
        if len(directions) != 1:
            raise UserError(f"hydra.sweeper.direction={directions}: one objective (optimized_metric) is optimised")
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    load_if_exists=True, direction=directions[0])
        if study.direction.name.lower() != directions[0]:
            raise UserError(f"optimized_mode: study {study.study_name} was made to {study.direction.name.lower()} "
                            f"its metric; keep that, or start another study with hparams_search.study=NEW")
        for trial in study.trials:  # the stored trials must fit the ranges asked now
            for name, distribution in space.items():
                if name in trial.distributions:
                    try:
                        check_distribution_compatibility(trial.distributions[name], distribution)
                    except ValueError:
                        raise UserError(f"{name}: study {study.study_name} searched {trial.distributions[name]}, "
                                        f"this run asks {distribution}; keep its range or start another study "
                                        "with hparams_search.study=NEW") from None
        self._settle_killed(study)
        if study.trials and "seed" in (self.config.hydra.sweeper.get("sampler") or {}):
            # the same seed would replay the random draws of the first run: continue past them instead
            sampler_cfg = OmegaConf.to_container(self.config.hydra.sweeper.sampler, resolve=True)
            if sampler_cfg.get("seed") is not None:
                sampler_cfg["seed"] = int(sampler_cfg["seed"]) + len(study.trials)
                study.sampler = instantiate(sampler_cfg)
        return study

    def _settle_killed(self, study: optuna.Study) -> None:
        """Trials a kill left RUNNING: told their value when their run had finished, else marked failed."""
        killed = []
        for trial in [t for t in study.trials if t.state == TrialState.RUNNING]:
            value = _finished_value(Path(self.config.hydra.sweep.dir) / str(trial.number))
            if value is None:
                study.tell(trial.number, state=TrialState.FAIL)
                killed.append(trial.number)
                log.info("trial %d was cut short by a kill: marked failed; a new trial takes its place", trial.number)
            else:
                study.tell(trial.number, value)
        if killed:
            study.set_user_attr(KILLED, study.user_attrs.get(KILLED, []) + killed)

    def sweep(self, arguments: list[str]) -> None:
        if getattr(self.sampler, "func", None) is optuna.samplers.GridSampler:
            raise UserError("hydra.sweeper.sampler: GridSampler is not supported here; for a grid run a plain "
                            "multirun (train -m optim.lr=1e-3,1e-2 ...)")
        self._process_searchspace_config()
        space, fixed = create_params_from_overrides(self._parse_sweeper_params_config() + list(arguments))
        for name in fixed:
            space.pop(name, None)
        study = self._study(space)
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
