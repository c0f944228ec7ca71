"""LightningModules that misbehave on purpose, for the trial and worker tests (importable by class path)."""

from __future__ import annotations

import time
from typing import Any

import torch

from lightstudy.examples import ConvNet


class NaNNet(ConvNet):
    """Its training loss becomes NaN at the first step."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * float("nan")


class RaisingNet(ConvNet):
    """Raises in the first training step."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        raise ValueError("boom: the model raised on purpose")


class OOMNet(ConvNet):
    """Raises CUDA's out-of-memory error, as a GPU that ran out would."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


class SilentNet(ConvNet):
    """Logs no val_acc: the study metric is missing."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))


class SlowNet(ConvNet):
    """Sleeps ``step_sleep`` seconds per training step, so a test can interrupt it mid-trial."""

    def __init__(self, step_sleep: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_sleep = step_sleep

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(self.step_sleep)
        return super().training_step(batch, batch_idx)


class ScoreNet(ConvNet):
    """Logs its accuracy as ``val_score``: a name the spec check cannot read a direction from."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_score(self(x), y)
        self.log("val_score", self.val_score)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from torchmetrics.classification import MulticlassAccuracy

        self.val_score = MulticlassAccuracy(10, average="micro")


class GateNet(ConvNet):
    """In the first validation batch of epoch ``gate_epoch`` it writes the file ``gate`` and waits
    until the trial process has received SIGTERM: a test signals a trial mid-validation, exactly."""

    def __init__(self, gate: str = "", gate_epoch: int = 1, gate_batch: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate
        self.gate_epoch = gate_epoch
        self.gate_batch = gate_batch

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        trainer = self.trainer
        if not trainer.sanity_checking and self.current_epoch == self.gate_epoch and batch_idx == self.gate_batch:
            from pathlib import Path

            Path(self.gate).write_text(str(self.current_epoch))
            deadline = time.monotonic() + 120
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.01)  # a poll on the process's own state, not a guess at timing
        return super().validation_step(batch, batch_idx)


class WorseningNet(ConvNet):
    """Logs ``val_acc = 0.9 - 0.1 * epoch``: only epoch 0 improves the study metric."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", 0.9 - 0.1 * self.current_epoch)


class LrNet(ConvNet):
    """Logs ``val_acc = lr``: a test orders its trials' values by the learning rates it enqueues."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", float(self.hparams.lr))
