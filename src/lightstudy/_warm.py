"""What the warm process (:mod:`lightstudy.warmserver`) does to itself before it forks trials.

Importing is only half of a warm start: a process's first ``LightningCLI`` parse of a class, first
``Trainer`` set-up, TensorBoard logger and training step fill jsonargparse's and Lightning's
caches and initialize torch's kernels and allocator, which costs a fresh process about a second.
So the warm process imports :data:`PRELOAD` and the study's classes, parses the study's own
config through its own ``cli:`` class (or checks the whole spec, for ``lightstudy run``), and,
once it is idle, runs lightstudy's trial path once on the CPU (the bundled digits, one step,
into a temporary folder). It never touches CUDA: the trial processes forked from it may still
use the GPU. Each stage is logged with its seconds; a failed warm-up stage costs speed, never a
trial's result.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightstudy.spec import StudySpec

__all__ = ["PRELOAD", "import_preload", "parse_study_config", "run_tiny_trial", "user_modules", "warm_stage"]

_LIGHTNING = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
_log = logging.getLogger(__name__)

_TINY = {
    "study": {"name": "warm-up", "metric": "val_acc", "n_trials": 1, "pruner": None},
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "limit_train_batches": 1,  # one step, and the epoch ends: validation runs (max_steps=1 never validated)
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
    },
    "model": {"class_path": "lightstudy.examples.ConvNet", "init_args": {"channels": 4, "hidden": 8}},
    "data": {"class_path": "lightstudy.examples.DigitsDataModule", "init_args": {"batch_size": 8}},
}


# What every trial process needs; imported by name, so no linter takes them for unused imports.
PRELOAD = (
    "torch",
    "torchmetrics",
    "lightning.pytorch",
    "lightning.pytorch.cli",
    "optuna",
    "optuna_integration",
    "optuna_integration.pytorch_lightning",
    "lightstudy.callbacks",
    "lightstudy.components",
    "lightstudy.lightning_config",
    "lightstudy.trial",
)


def user_modules(spec: StudySpec) -> list[str]:
    """The modules of the study's model and data classes (imported once, by the warm process)."""
    modules = []
    for section in ("model", "data"):
        value = spec.config.get(section)
        if isinstance(value, dict) and isinstance(value.get("class_path"), str):
            modules.append(value["class_path"].rpartition(".")[0])
    return modules


def import_preload(spec: StudySpec | None = None) -> None:
    """Import :data:`PRELOAD` (and the study's modules: one that fails to import is left to the
    trial, which reports it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
        for name in user_modules(spec) if spec is not None else []:
            try:
                importlib.import_module(name)
            except Exception as e:
                _log.warning("warm process: could not import %s (%s: %s)", name, type(e).__name__, e)


def warm_stage(name: str, run: Any, seconds: dict[str, float]) -> None:
    """Run one warm-up stage quietly; its seconds go to ``seconds``, a failure to the log (WARNING)."""
    start = time.perf_counter()
    try:
        with quiet_lightning():
            run()
    except Exception as e:  # a warm-up that fails costs the trials' speed, nothing else
        _log.warning("warm-up: the %s failed, trials start cold (%s: %s)", name, type(e).__name__, e)
    else:
        seconds[name] = time.perf_counter() - start


def run_tiny_trial() -> None:
    """lightstudy's own trial path once: the bundled digits, one step on the CPU, a temporary folder."""
    import torch

    # One thread: a forked child inherits no OpenMP pool to rebuild (each trial sets its own).
    torch.set_num_threads(1)
    from lightstudy.spec import spec_from_dict
    from lightstudy.trial import _add_trial_defaults, _versions, fit_config

    with tempfile.TemporaryDirectory(prefix="lightstudy-warm-") as tmp:
        spec = spec_from_dict(_TINY)
        config = spec.lightning_config()
        _add_trial_defaults(config, "lightning.pytorch", Path(tmp), "trials/trial-0000")
        fit_config(config, spec.study, ckpt_dir=Path(tmp) / "checkpoints", seed=0)
    _versions("lightning.pytorch")


def parse_study_config(spec: StudySpec) -> None:
    """The study's own config through its own ``cli:`` class (its links included), as a trial
    parses it: the parser every trial reuses is built here, and the versions a trial records read."""
    from lightstudy.lightning_config import lightning_namespace, warm_parser
    from lightstudy.trial import _versions

    config = spec.lightning_config()
    warm_parser(config, spec.cli)
    _versions(lightning_namespace(config))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's loggers at ERROR and stdout/stderr swallowed while the warm-up trains."""
    loggers = [logging.getLogger(n) for n in _LIGHTNING]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
