"""The callbacks lightstudy adds to every trial's Trainer, for either Lightning namespace.

- pruning: ``optuna_integration.PyTorchLightningPruningCallback`` on the study metric, which here
  fails with the list of logged metrics when the metric is missing, instead of a warning;
- guard: stops a trial whose loss is not finite, and on a stop request (SIGTERM/SIGINT to the
  trial process) saves a checkpoint and ends the trial so the worker can hand it back.
"""

from __future__ import annotations

import functools
import math
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy.errors import TrialError
from lightstudy.lightning_config import pl_module
from lightstudy.storage import retry_db

if TYPE_CHECKING:
    import optuna

__all__ = ["TrialInterrupted", "guard_callback", "pruning_callback", "request_stop", "stop_requested"]

_STOP = {"requested": False}


class TrialInterrupted(Exception):
    """The trial process was asked to stop; its checkpoint is saved for the retry."""


def request_stop(signum: int = 0, frame: Any = None) -> None:
    """Signal handler of the trial process: finish the current batch, save, and end."""
    _STOP["requested"] = True


def stop_requested() -> bool:
    return _STOP["requested"]


def install_stop_handlers() -> None:
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def _missing(metrics: Any, wanted: list[str]) -> TrialError:
    logged = ", ".join(sorted(metrics)) or "none"
    return TrialError(
        f"the study metric {wanted[0]!r} was not logged; the module logged: {logged}",
        fix=f"log it with self.log({wanted[0]!r}, ...) in validation_step, or set study.metric "
        "to one of the logged metrics",
    )


@functools.cache
def _pruning_class(namespace: str) -> type:
    from optuna_integration import PyTorchLightningPruningCallback

    bases: tuple[type, ...] = (PyTorchLightningPruningCallback,)
    if namespace != "lightning.pytorch":  # also a pytorch_lightning.Callback, for its Trainer
        bases += (pl_module(namespace).Callback,)

    class LightstudyPruningCallback(*bases):  # type: ignore[misc]
        """Optuna's pruning callback; a missing metric is an error naming the logged ones."""

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking and self.monitor not in trainer.callback_metrics:
                raise _missing(trainer.callback_metrics, [self.monitor])
            # report() and should_prune() talk to the database: ride out a restart.
            parent: Any = super()
            retry_db(lambda: parent.on_validation_end(trainer, pl_module), what="report to the study")

    return LightstudyPruningCallback


def pruning_callback(namespace: str, trial: optuna.Trial, monitor: str) -> Any:
    """Optuna's PyTorchLightningPruningCallback, usable by the Trainer of ``namespace``."""
    return _pruning_class(namespace)(trial, monitor)


@functools.cache
def _guard_class(namespace: str) -> type:
    import torch

    base = pl_module(namespace).Callback

    class TrialGuard(base):  # type: ignore[misc, valid-type]
        def __init__(self, metrics: list[str], save_to: Path) -> None:
            self.metrics = metrics
            self.save_to = save_to

        def _stop_if_asked(self, trainer: Any) -> None:
            if stop_requested():
                trainer.save_checkpoint(self.save_to)
                raise TrialInterrupted(
                    f"stopped by signal at epoch {trainer.current_epoch}, step {trainer.global_step}"
                )

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            print(f"training starts at epoch {trainer.current_epoch}", flush=True)
            self._stop_if_asked(trainer)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
                raise TrialError(
                    f"the training loss became {loss.item()} at epoch {trainer.current_epoch}, "
                    f"step {trainer.global_step}",
                    fix="lower the learning rate (or its search range), or clip gradients (trainer.gradient_clip_val)",
                )
            self._stop_if_asked(trainer)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking:
                return
            missing = [m for m in self.metrics if m not in trainer.callback_metrics]
            if missing:
                raise _missing(trainer.callback_metrics, missing)
            for name in self.metrics:
                value = float(trainer.callback_metrics[name])
                if not math.isfinite(value):
                    raise TrialError(
                        f"the study metric {name!r} is {value} at epoch {trainer.current_epoch}",
                        fix="check the model for a diverging loss; lower the learning rate",
                    )

    return TrialGuard


def guard_callback(namespace: str, metrics: list[str], save_to: Path) -> Any:
    """Non-finite loss or metric fails the trial; a stop request saves to ``save_to`` and ends it."""
    return _guard_class(namespace)(metrics, save_to)


def checkpoint_callback(namespace: str, dirpath: Path, monitor: str | None, mode: str) -> Any:
    """Lightning's ModelCheckpoint: the best epoch on the study metric, and ``last.ckpt`` for resume."""
    model_checkpoint = pl_module(namespace).callbacks.ModelCheckpoint
    label = (monitor or "").replace("/", "_")  # a '/' in a metric name would make a folder
    filename = f"epoch={{epoch}}-{label}={{{monitor}:.4f}}" if monitor else "epoch={epoch}"
    return model_checkpoint(
        dirpath=str(dirpath),
        filename=filename,
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )
