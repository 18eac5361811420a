"""Fine-tune pretrained torchvision image classifiers with PyTorch Lightning, configured by Hydra."""

__version__ = "0.1.0"
