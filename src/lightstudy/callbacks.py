"""The callbacks lightstudy adds to every trial's Trainer, for either Lightning namespace.

- pruning: ``optuna_integration.PyTorchLightningPruningCallback`` on the study metric, which here
  fails with the list of logged metrics when the metric is missing, instead of a warning;
- guard: stops a trial whose loss is not finite, and on a stop request (SIGTERM/SIGINT to the
  trial process) saves a checkpoint and ends the trial so the worker can hand it back.
"""

from __future__ import annotations

import functools
import importlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy.errors import TrialError
from lightstudy.stopping import install_stop_handlers, request_stop, stop_requested
from lightstudy.storage import retry_db

if TYPE_CHECKING:
    import optuna

__all__ = [
    "TrialInterrupted",
    "checkpoint_callback",
    "guard_callback",
    "hyperparameters_callback",
    "install_stop_handlers",
    "last_checkpoint_callback",
    "pruning_callback",
    "request_stop",
    "stop_requested",
    "time_checkpoint_io",
]


class TrialInterrupted(Exception):
    """The trial process was asked to stop; its checkpoint is saved for the retry."""


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
        bases += (importlib.import_module(namespace).Callback,)

    class LightstudyPruningCallback(*bases):  # type: ignore[misc]
        """Optuna's pruning callback; a missing metric is an error naming the logged ones."""

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking and self.monitor not in trainer.callback_metrics:
                raise _missing(trainer.callback_metrics, [self.monitor])
            if not trainer.sanity_checking and trainer.is_global_zero:
                value = float(trainer.callback_metrics[self.monitor])
                print(f"rank 0 reports {self.monitor}={value!r} at epoch {pl_module.current_epoch}", flush=True)
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

    base = importlib.import_module(namespace).Callback

    class TrialGuard(base):  # type: ignore[misc, valid-type]
        def __init__(self, metrics: list[str], save_to: Path, directions: list[str] | None = None) -> None:
            self.metrics = metrics
            self.save_to = save_to
            self.directions = directions or []
            self.warnings: list[str] = []
            self._batch: Any = None
            self._checked_directions = False

        def on_validation_batch_start(
            self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
        ) -> None:
            if LATENCY in self.metrics and self._batch is None:
                self._batch = batch

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            # Built-in objectives the trial measures itself, unless the module logs them.
            if trainer.sanity_checking:
                return
            if PARAM_COUNT in self.metrics and PARAM_COUNT not in trainer.callback_metrics:
                count = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
                pl_module.log(PARAM_COUNT, float(count))
            if LATENCY in self.metrics and LATENCY not in trainer.callback_metrics and self._batch is not None:
                pl_module.log(LATENCY, _forward_ms(pl_module, self._batch))

        def _stop_if_asked(self, trainer: Any) -> None:
            # Under DDP every rank must stop at the same batch, or the others hang in a collective.
            if _together(trainer, stop_requested()):
                trainer.save_checkpoint(self.save_to)
                raise TrialInterrupted(
                    f"stopped by signal at epoch {trainer.current_epoch}, step {trainer.global_step}"
                )

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            # Lightning raises its own SIGTERMException at points our batch hook never sees
            # (mid-validation, epoch end): save where training stands, so the retry resumes there.
            if stop_requested() and not isinstance(exception, TrialInterrupted):
                try:
                    trainer.save_checkpoint(self.save_to)
                    print(f"stopped by signal; saved {self.save_to}", flush=True)
                except Exception as e:  # the last epoch's checkpoint is still there
                    print(f"stopped by signal; could not save a checkpoint: {e}", flush=True)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            print(f"training starts at epoch {trainer.current_epoch}", flush=True)
            self._stop_if_asked(trainer)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            bad = isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all())
            if _together(trainer, bad):
                shown = loss.item() if isinstance(loss, torch.Tensor) and loss.numel() == 1 else "non-finite"
                raise TrialError(
                    f"the training loss became {shown} at epoch {trainer.current_epoch}, step {trainer.global_step}",
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
            if not self._checked_directions:
                self._checked_directions = True
                self.warnings += _direction_warnings(pl_module, self.metrics, self.directions)
                for text in self.warnings:
                    print(f"warning: {text}", flush=True)

    return TrialGuard


def _together(trainer: Any, decision: bool) -> bool:
    """True on every rank when it is true on any (a no-op on one device)."""
    if trainer.world_size > 1:
        return bool(trainer.strategy.reduce_boolean_decision(decision, all=False))
    return decision


PARAM_COUNT = "param_count"  # objective lightstudy measures: trainable parameters of the model
LATENCY = "latency_ms"  # objective lightstudy measures: milliseconds of one forward pass of a validation batch


def _forward_ms(pl_module: Any, batch: Any, repeats: int = 5) -> float:
    """Median wall time of a forward pass of ``batch`` (the inputs: its first item), in ms."""
    import time

    import torch

    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    cuda = isinstance(x, torch.Tensor) and x.is_cuda
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            pl_module(x)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000.0)
    return sorted(times)[len(times) // 2]


def _direction_warnings(pl_module: Any, metrics: list[str], directions: list[str]) -> list[str]:
    """A torchmetrics Metric logged under a study metric's name whose higher_is_better says the
    opposite of the study's direction."""
    try:
        from torchmetrics import Metric
    except ImportError:
        return []
    found = {name.rsplit(".", 1)[-1]: m for name, m in pl_module.named_modules() if isinstance(m, Metric)}
    out = []
    for metric, direction in zip(metrics, directions):
        module = found.get(metric.replace("/", "_"))
        better = getattr(module, "higher_is_better", None)
        if better is None:
            continue
        if (better and direction == "minimize") or (not better and direction == "maximize"):
            out.append(
                f"study direction {direction} for {metric!r} contradicts {type(module).__name__}."
                f"higher_is_better={better}; fix: set direction: {'maximize' if better else 'minimize'}"
            )
    return out


def guard_callback(namespace: str, metrics: list[str], save_to: Path, directions: list[str] | None = None) -> Any:
    """Non-finite loss or metric fails the trial; a stop request saves to ``save_to`` and ends it;
    ``param_count``/``latency_ms`` objectives are measured; a direction that contradicts a
    torchmetrics metric's ``higher_is_better`` is reported (``guard.warnings``)."""
    return _guard_class(namespace)(metrics, save_to, directions)


@functools.cache
def _last_class(namespace: str) -> type:
    # A Checkpoint callback: Lightning runs those after every other callback, in list order, so
    # this one (listed after ModelCheckpoint) saves the epoch's best-checkpoint state with it.
    base = importlib.import_module(namespace).callbacks.Checkpoint

    class LastCheckpoint(base):  # type: ignore[misc, valid-type]
        """Saves where training stands to ``path`` at the end of every training epoch (after
        its validation), whatever the metric did: a retry resumes at the next epoch. (Saved at
        validation end instead, the checkpoint reads as mid-epoch and the epoch is run again.)"""

        def __init__(self, path: Path) -> None:
            self.path = path

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            trainer.save_checkpoint(self.path)

    return LastCheckpoint


def last_checkpoint_callback(namespace: str, path: Path) -> Any:
    """Save ``path`` (a trial's ``last.ckpt``) at every epoch's end, always to that one file."""
    return _last_class(namespace)(path)


@functools.cache
def _timed_io_class(namespace: str) -> type:
    base = importlib.import_module(namespace).plugins.CheckpointIO

    class TimedCheckpointIO(base):  # type: ignore[misc, valid-type]
        """The strategy's CheckpointIO, timed (``seconds``), writing each file atomically: a
        process killed mid-save leaves the previous checkpoint whole."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.seconds = 0.0

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            import os
            import time

            start = time.time()
            partial = f"{path}.partial"
            try:
                self.inner.save_checkpoint(checkpoint, partial, storage_options=storage_options)
                os.replace(partial, path)
            finally:
                self.seconds += time.time() - start

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

        def remove_checkpoint(self, path: Any) -> None:
            self.inner.remove_checkpoint(path)

        def teardown(self) -> None:
            self.inner.teardown()

    return TimedCheckpointIO


def time_checkpoint_io(namespace: str, trainer: Any) -> Any:
    """Wrap ``trainer``'s CheckpointIO so that saves are timed and atomic; returns the wrapper
    (its ``seconds``: time spent writing checkpoints)."""
    timed = _timed_io_class(namespace)(trainer.strategy.checkpoint_io)
    trainer.strategy.checkpoint_io = timed
    return timed


def checkpoint_callback(namespace: str, dirpath: Path, monitor: str | None, mode: str) -> Any:
    """Lightning's ModelCheckpoint: the best epoch on the study metric (``last.ckpt`` is
    :func:`last_checkpoint_callback`'s: ModelCheckpoint's own is written only on epochs that
    enter its top k, and as ``last-v1.ckpt`` after a resume)."""
    model_checkpoint = importlib.import_module(namespace).callbacks.ModelCheckpoint
    label = (monitor or "").replace("/", "_")  # a '/' in a metric name would make a folder
    filename = f"epoch={{epoch}}-{label}={{{monitor}:.4f}}" if monitor else "epoch={epoch}"
    return model_checkpoint(
        dirpath=str(dirpath),
        filename=filename,
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=False,
        auto_insert_metric_name=False,
    )


@functools.cache
def _hyperparameters_class(namespace: str) -> type:
    class KeepHyperparameters(importlib.import_module(namespace).Callback):  # type: ignore[misc]
        """Restored optimizers keep their state but take this trial's hyperparameters: each param
        group's values (all but ``params``) as ``configure_optimizers`` built them, read in
        ``on_fit_start`` (before the checkpoint's optimizer state is loaded) and put back in
        ``on_train_start`` (after). A PBT exploit's explored ``lr`` then takes effect."""

        def __init__(self) -> None:
            self.groups: list[list[dict[str, Any]]] = []

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.groups = [
                [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in trainer.optimizers
            ]

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            for opt, groups in zip(trainer.optimizers, self.groups):
                for group, fresh in zip(opt.param_groups, groups):
                    group.update(fresh)
            for config in trainer.lr_scheduler_configs:  # a scheduler restarts from the new values
                scheduler = config.scheduler
                if hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in scheduler.optimizer.param_groups]

    return KeepHyperparameters


def hyperparameters_callback(namespace: str) -> Any:
    """A callback that gives restored optimizers this trial's hyperparameters (see its class)."""
    return _hyperparameters_class(namespace)()
