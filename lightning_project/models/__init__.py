"""Networks and what trains in them; plain Python, no Hydra."""

from lightning_project.models.checkpoints import check_resumable, load_checkpoint
from lightning_project.models.classifier import ClassifierModule

__all__ = ["ClassifierModule", "check_resumable", "load_checkpoint"]
