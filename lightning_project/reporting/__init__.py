"""Reports over several runs: the sweep report (`python -m lightning_project.report SWEEP_DIR`, and
the Hydra callback that writes it at the end of every multirun)."""

from lightning_project.reporting.sweep import Report, command, show, write_report

__all__ = ["Report", "command", "show", "write_report"]
