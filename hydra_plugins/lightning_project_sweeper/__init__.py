"""Our Hydra plugin: the resumable, failure-tolerant Optuna sweeper (lightning_project/sweeping/optuna.py).
Hydra imports every hydra_plugins module at start, so this one imports nothing heavy until it is used."""
