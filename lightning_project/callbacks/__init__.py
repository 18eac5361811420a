"""Our callbacks (only what Lightning's own do not do)."""

from lightning_project.callbacks.collapse import CollapseDetector
from lightning_project.callbacks.crash_safety import (
    AtomicCheckpointIO,
    RandomStateInCheckpoint,
    SaveOnInterrupt,
    StopOnNonFiniteLoss,
)
from lightning_project.callbacks.history import EpochHistory
from lightning_project.callbacks.progress import LossProgressBar

__all__ = ["AtomicCheckpointIO", "CollapseDetector", "EpochHistory", "LossProgressBar", "RandomStateInCheckpoint",
           "SaveOnInterrupt", "StopOnNonFiniteLoss"]
