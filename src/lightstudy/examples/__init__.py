"""Built-in LightningModules and LightningDataModules to search over (``lightning.pytorch``).

``lightstudy.examples.classic`` holds the same classes for ``pytorch_lightning``.
"""

from __future__ import annotations

from lightstudy.examples.convnet import ConvNet
from lightstudy.examples.digits import DigitsDataModule

__all__ = ["ConvNet", "DigitsDataModule"]
