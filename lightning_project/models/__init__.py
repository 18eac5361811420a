"""Networks and what trains in them; plain Python, no Hydra."""

from lightning_project.models.classifier import ClassifierModule, load_checkpoint

__all__ = ["ClassifierModule", "load_checkpoint"]
