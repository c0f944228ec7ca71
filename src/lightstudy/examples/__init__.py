"""Built-in LightningModules and LightningDataModules to search over (``lightning.pytorch``).

``lightstudy.examples.classic`` holds the digits classes for ``pytorch_lightning``. The
torchvision data modules and :class:`TorchvisionClassifier` import torchvision at once; only
trial processes import this package.
"""

from __future__ import annotations

from lightstudy.examples.convnet import ConvNet
from lightstudy.examples.digits import DigitsDataModule
from lightstudy.examples.torchvision_model import TorchvisionClassifier
from lightstudy.examples.vision import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "ConvNet",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "TorchvisionClassifier",
]
