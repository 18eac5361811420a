"""Images, splits, augmentation pipelines and loaders; plain Python, no Hydra."""

from lightning_project.data.datamodules import (
    CIFAR10DataModule,
    CSVDataModule,
    DigitsDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    create_datamodule,
)

__all__ = ["ImageDataModule", "DigitsDataModule", "ImageFolderDataModule", "CIFAR10DataModule", "CSVDataModule",
           "create_datamodule"]
