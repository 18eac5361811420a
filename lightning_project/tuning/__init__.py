"""Checks before a long run (`python -m lightning_project.tune`): initial loss, overfitting one batch,
a learning-rate range test that keeps the parameter groups' ratios, the largest batch that fits.

Plain Python like `models/` and `data/`: functions take a module, loaders and typed options; the
entry point `lightning_project/tune.py` is the only part that reads the Hydra config.
"""

from lightning_project.tuning.options import CHECKS, TuneOptions
from lightning_project.tuning.report import CheckResult

__all__ = ["CHECKS", "CheckResult", "TuneOptions"]
