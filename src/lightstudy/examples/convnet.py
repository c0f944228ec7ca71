"""ConvNet: a small convolutional classifier that logs torchmetrics scores."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as lp
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ConvNet", "ConvNetMixin"]

_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


class ConvNetMixin:
    """The model's logic, shared by the ``lightning.pytorch`` and ``pytorch_lightning`` classes.

    Logs ``train_loss``, ``val_loss``, ``val_acc``, ``test_loss`` and ``test_acc`` (micro accuracy).
    """

    def __init__(
        self,
        lr: float = 0.01,  # learning rate of the optimizer
        channels: int = 16,  # filters of the first conv layer; the second has twice as many
        hidden: int = 64,  # units of the fully connected layer
        dropout: float = 0.1,  # dropout probability before each linear layer
        weight_decay: float = 0.0,  # L2 penalty (decoupled for adamw)
        optimizer: str = "adam",  # adam, adamw or sgd (with momentum 0.9)
        scheduler: str = "none",  # none, or cosine: anneal lr to 0 over trainer.max_epochs
        num_classes: int = 10,  # output classes
        in_channels: int = 1,  # image channels
        image_size: int = 8,  # image height and width, in pixels (multiple of 2)
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {sorted(_OPTIMIZERS)}, but got {optimizer=}.")
        if scheduler not in ("none", "cosine"):
            raise ValueError(f"`scheduler` must be 'none' or 'cosine', but got {scheduler=}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`0 <= dropout < 1` must hold, but got {dropout=}.")
        self.save_hyperparameters()  # type: ignore[attr-defined]
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.scheduler_name = scheduler
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 2 * channels * (image_size // 2) ** 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(flat, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)  # type: ignore[operator]
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)  # type: ignore[attr-defined]
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)  # type: ignore[operator]
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)  # type: ignore[attr-defined]
        self.log("val_acc", self.val_acc, prog_bar=True)  # type: ignore[attr-defined]

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)  # type: ignore[operator]
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y), sync_dist=True)  # type: ignore[attr-defined]
        self.log("test_acc", self.test_acc)  # type: ignore[attr-defined]

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=1)  # type: ignore[operator]

    def configure_optimizers(self) -> Any:
        params = self.parameters()  # type: ignore[attr-defined]
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        else:
            opt = _OPTIMIZERS[self.optimizer_name](params, lr=self.lr, weight_decay=self.weight_decay)
        if self.scheduler_name == "none":
            return opt
        epochs = max(1, self.trainer.max_epochs or 1)  # type: ignore[attr-defined]
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)}


class ConvNet(ConvNetMixin, lp.LightningModule):
    """A small CNN for 8x8 digits (or any small images) as a ``lightning.pytorch`` LightningModule.

    Example:
        ``model: {class_path: lightstudy.examples.ConvNet, init_args: {lr: 0.01, channels: 16}}``
    """
