"""Optimizers over parameter groups, and learning-rate schedules that know every group."""

from lightning_project.optim.optimizers import build_optimizer
from lightning_project.optim.schedulers import SCHEDULERS, build_scheduler

__all__ = ["build_optimizer", "build_scheduler", "SCHEDULERS"]
