"""`hydra.sweeper._target_: hydra_plugins.lightning_project_sweeper.resumable_optuna.ResumableOptunaSweeper`."""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class ResumableOptunaSweeper(OptunaSweeper):
    """The Optuna plugin's sweeper (same keys: sampler, direction, storage, study_name, n_trials, n_jobs,
    params) running our loop: resumable, a failed trial does not stop the sweep."""

    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None, n_trials: int,
                 n_jobs: int, params: Any = None, search_space: Any = None,
                 custom_search_space: str | None = None) -> None:
        from lightning_project.sweeping.optuna import ResumableSweeperImpl  # optuna: imported when used

        self.sweeper = ResumableSweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs, search_space,
                                            custom_search_space, params)

    def sweep(self, arguments: list[str]) -> None:
        from lightning_project.utils.runtime import user_errors

        with user_errors():  # a study that does not fit the command: one line, exit 2
            return self.sweeper.sweep(arguments)
