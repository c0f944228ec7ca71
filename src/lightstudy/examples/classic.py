"""The examples for the ``pytorch_lightning`` namespace (``import pytorch_lightning as pl``).

A study whose model and data subclass ``pytorch_lightning`` classes trains with
``pytorch_lightning.Trainer``; name these in a spec to use it::

    model: {class_path: lightstudy.examples.classic.ConvNet}
    data: {class_path: lightstudy.examples.classic.DigitsDataModule}
"""

from __future__ import annotations

import pytorch_lightning as pl

from lightstudy.examples.convnet import ConvNetMixin
from lightstudy.examples.digits import DigitsDataMixin

__all__ = ["ConvNet", "DigitsDataModule"]


class ConvNet(ConvNetMixin, pl.LightningModule):
    """:class:`lightstudy.examples.ConvNet` as a ``pytorch_lightning.LightningModule``."""


class DigitsDataModule(DigitsDataMixin, pl.LightningDataModule):
    """:class:`lightstudy.examples.DigitsDataModule` as a ``pytorch_lightning.LightningDataModule``."""
