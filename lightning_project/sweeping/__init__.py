"""Sweeps: one run of a sweep that may fail without stopping it, and the resumable Optuna sweeper."""

from lightning_project.sweeping.trials import FAILURE, run_trial

__all__ = ["FAILURE", "run_trial"]
