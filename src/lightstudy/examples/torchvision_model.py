"""TorchvisionClassifier: any ``torchvision.models`` classification architecture as a LightningModule."""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as lp
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

__all__ = ["TorchvisionClassifier"]

_log = logging.getLogger(__name__)


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first Conv2d registered, which in torchvision's classifiers is the one the image meets."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"`in_channels`: the model must have a Conv2d to adapt, but {type(model).__name__} has none")


def _head_prefix(model: nn.Module) -> str:
    """The last Linear layer: the classifier head, whose shape follows ``num_classes``."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else ""


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _adapt_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    # RGB filters on other channel counts: summed for gray, else repeated and rescaled so that the
    # activations keep their scale (the usual recipe, as in timm's adapt_input_conv).
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


class TorchvisionClassifier(lp.LightningModule):
    """A ``torchvision.models`` classifier (``arch`` by name, never downloaded) with torchmetrics scores.

    Logs ``train_loss``, ``val_loss``, ``val_acc`` (micro accuracy), ``val_f1`` (macro F1), and at
    test time ``test_loss``, ``test_acc``, ``test_f1`` and ``test_acc_class_<i>``. Targets may be
    class indices or class probabilities (MixUp/CutMix soft labels); accuracy on soft targets is
    taken against their argmax. ``predict_step`` returns class indices.

    The optimizer is AdamW with ``lr`` and ``weight_decay`` (cosine-annealed over
    ``trainer.max_epochs`` when ``cosine``); a spec's ``optimizer:``/``lr_scheduler:`` sections,
    when present, replace it (LightningCLI overrides ``configure_optimizers``), and then ``lr``,
    ``weight_decay`` and ``cosine`` here are unused.

    Example:
        ``model: {class_path: lightstudy.examples.TorchvisionClassifier,
        init_args: {arch: resnet18, num_classes: 10, small_images: true}}``
    """

    def __init__(
        self,
        arch: str = "resnet18",  # a torchvision.models classification builder, e.g. resnet50, convnext_tiny
        num_classes: int = 10,  # output classes
        in_channels: int = 3,  # image channels; the first conv is rebuilt when not 3 (1: gray)
        small_images: bool = False,  # ResNets for ~32 px images: 3x3 stride-1 first conv, no max-pool
        pretrained_weights: str | None = None,  # local state-dict file (never downloaded); head may differ
        lr: float = 1e-3,  # AdamW learning rate
        weight_decay: float = 0.05,  # AdamW decoupled weight decay
        label_smoothing: float = 0.0,  # share of each target spread over all classes
        cosine: bool = False,  # anneal lr to 0 over trainer.max_epochs (stepped per epoch)
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes >= 2` must hold, but got {num_classes=}.")
        if in_channels < 1:
            raise ValueError(f"`in_channels >= 1` must hold, but got {in_channels=}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"`0 <= label_smoothing < 1` must hold, but got {label_smoothing=}.")
        self.save_hyperparameters()
        self.lr = lr
        self.weight_decay = weight_decay
        self.label_smoothing = label_smoothing
        self.cosine = cosine
        # Everything is built here, not in setup: LightningCLI builds the spec's optimizer from
        # model.parameters() right after __init__.
        self.model = self._build(arch, num_classes, in_channels, small_images)
        if pretrained_weights is not None:
            self._load_weights(pretrained_weights, in_channels)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_acc_class = MulticlassAccuracy(num_classes, average=None)

    @staticmethod
    def _build(arch: str, num_classes: int, in_channels: int, small_images: bool) -> nn.Module:
        known = torchvision.models.list_models(module=torchvision.models)  # classification only
        if arch not in known:
            close = difflib.get_close_matches(arch, known, n=3)
            raise ValueError(
                f"`arch` must be a torchvision.models classification model, but got {arch!r}; "
                f"fix: {'did you mean ' + ', '.join(close) + '?' if close else 'see list_models()'}"
            )
        model: nn.Module = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        if small_images:
            conv = getattr(model, "conv1", None)
            if not isinstance(conv, nn.Conv2d) or not isinstance(getattr(model, "maxpool", None), nn.Module):
                raise ValueError(
                    f"`small_images` needs a ResNet-style model (conv1 + maxpool), but got {arch=}; "
                    "fix: use resnet*/resnext*/wide_resnet*, or small_images: false"
                )
            model.conv1 = nn.Conv2d(in_channels, conv.out_channels, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            name, conv = _first_conv(model)
            new = nn.Conv2d(
                in_channels,
                conv.out_channels,
                conv.kernel_size,  # type: ignore[arg-type]
                stride=conv.stride,  # type: ignore[arg-type]
                padding=conv.padding,  # type: ignore[arg-type]
                dilation=conv.dilation,  # type: ignore[arg-type]
                groups=conv.groups,
                bias=conv.bias is not None,
            )
            _replace(model, name, new)
        return model

    def _load_weights(self, path: str, in_channels: int) -> None:
        """Load a local state dict; the head and an adapted first conv may differ, nothing else."""
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"`pretrained_weights` must be a local state-dict file, but {path!r} does not exist; "
                "fix: give the path of a file saved with torch.save(model.state_dict(), path) "
                "(e.g. torchvision's resnet18-f37072fd.pth), or null; nothing is downloaded"
            )
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            first_line = str(e).strip().splitlines()[0][:200]  # torch's own text runs to a page
            raise ValueError(
                f"`pretrained_weights` {path!r} must load with torch.load(weights_only=True), but it "
                f"raised {type(e).__name__}: {first_line}; fix: save the weights with "
                "torch.save(model.state_dict(), path)"
            ) from e
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]  # a Lightning checkpoint of this class
        if not isinstance(loaded, Mapping):
            raise ValueError(
                f"`pretrained_weights` {path!r} must hold a state dict, but holds a "
                f"{type(loaded).__name__}; fix: save model.state_dict(), not the model"
            )
        state = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        if state and all(k.startswith("model.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items()}
        own = self.model.state_dict()
        head, (conv_name, _) = _head_prefix(self.model), _first_conv(self.model)
        may_differ = tuple(p + "." for p in (head, conv_name) if p)
        fitting, unfit = {}, []
        for key, target in own.items():
            value = state.get(key)
            if value is not None and value.shape == target.shape:
                fitting[key] = value
            elif (
                value is not None
                and key == conv_name + ".weight"
                and value.ndim == 4
                and value.shape[0] == target.shape[0]
                and value.shape[2:] == target.shape[2:]
            ):
                fitting[key] = _adapt_channels(value, in_channels)
            elif not key.startswith(may_differ):
                unfit.append(key if value is None else f"{key} {tuple(value.shape)}≠{tuple(target.shape)}")
        # Tensors the model has no place for mean another architecture (resnet34 into resnet18).
        unfit += [f"{key} (not in the model)" for key in state if key not in own and not key.startswith(may_differ)]
        if unfit:
            raise ValueError(
                f"`pretrained_weights` {path!r} must fit arch {self.hparams['arch']!r} (only the head "
                f"{head!r} and the first conv may differ), but {len(unfit)} tensors do not "
                f"({', '.join(unfit[:3])}{' ...' if len(unfit) > 3 else ''}); fix: use weights of the "
                "same architecture"
            )
        self.model.load_state_dict(fitting, strict=False)
        skipped = sorted(set(own) - set(fitting))
        _log.info("loaded %d tensors from %s; kept fresh: %s", len(fitting), path, ", ".join(skipped) or "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        # Inception and GoogLeNet return (logits, aux...) while training.
        return out if isinstance(out, torch.Tensor) else out.logits

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # cross_entropy takes class indices or, for MixUp/CutMix, a (batch, classes) float tensor.
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    @staticmethod
    def _hard(target: torch.Tensor) -> torch.Tensor:
        return target.argmax(dim=1) if target.is_floating_point() and target.ndim == 2 else target

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.train_acc(logits, self._hard(y))
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        hard = self._hard(y)
        self.val_acc(logits, hard)
        self.val_f1(logits, hard)
        self.log("val_loss", self._loss(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)
        self.log("val_f1", self.val_f1)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        hard = self._hard(y)
        self.test_acc(logits, hard)
        self.test_f1(logits, hard)
        self.test_acc_class.update(logits, hard)
        self.log("test_loss", self._loss(logits, y))
        self.log("test_acc", self.test_acc)
        self.log("test_f1", self.test_f1)

    def on_test_epoch_end(self) -> None:
        for i, value in enumerate(self.test_acc_class.compute()):
            self.log(f"test_acc_class_{i}", value)
        self.test_acc_class.reset()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.cosine:
            return opt
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError(
                f"`cosine` anneals over trainer.max_epochs, which must be >= 1, but got {epochs}; "
                "fix: set trainer.max_epochs, or cosine: false"
            )
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)}
