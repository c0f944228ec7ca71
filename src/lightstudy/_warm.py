"""Imported once by each worker's forkserver, so every trial process starts with these loaded.

Importing is only half of a warm start: a process's first ``LightningCLI`` parse of a class, first
``Trainer`` set-up, TensorBoard logger and training step fill jsonargparse's and Lightning's
caches and initialize torch's kernels and allocator, which costs a fresh process about a second.
So the forkserver also runs lightstudy's own trial path once on the CPU (the bundled digits, one
step, into a temporary folder) and parses the study's own config (``LIGHTSTUDY_WARM_SPEC``, set by
the worker) before it forks any trial. It never touches CUDA: the trial processes forked from it
may still use the GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

WARM_SPEC_VAR = "LIGHTSTUDY_WARM_SPEC"  # the study's spec (JSON) the worker passes to its forkserver
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
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


def warm_forkserver(study_spec: str | None) -> dict[str, float]:
    """Warm this process (the worker's forkserver) for the trial processes it will fork; log it.

    Imports :data:`PRELOAD`, runs lightstudy's trial path once on the bundled digits (CPU, one
    step) and parses ``study_spec`` (the study's spec as JSON, or None) with the study's own
    ``cli:`` class. Logs what it imported and the seconds each stage took (INFO), or why a stage
    failed (WARNING): a failed warm-up costs the first trial's start, never its result.
    Returns the seconds per stage.
    """
    if not logging.getLogger().handlers:  # a fresh forkserver: its log goes to the worker's stderr
        verbose = os.environ.get("LIGHTSTUDY_VERBOSE", "") not in ("", "0")
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=_LOG_FORMAT)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
    seconds["import"] = time.perf_counter() - start
    stages = [("trial path", _run_tiny_trial)]
    if study_spec:
        stages.append(("study config", lambda: _parse_study_config(study_spec)))
    for stage, run in stages:
        start = time.perf_counter()
        try:
            with _quiet_lightning():
                run()
        except Exception as e:  # a warm-up that fails costs the first trial's speed, nothing else
            _log.warning("forkserver warm-up: the %s failed, trials start cold (%s: %s)", stage, type(e).__name__, e)
        else:
            seconds[stage] = time.perf_counter() - start
    _log.info(
        "forkserver warm-up: imported %s; %s",
        ", ".join(PRELOAD),
        ", ".join(f"{name} {value:.2f}s" for name, value in seconds.items()),
    )
    return seconds


def _run_tiny_trial() -> None:
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


def _parse_study_config(study_spec: str) -> None:
    """The study's own config through its own ``cli:`` class (its links included), as a trial parses it."""
    from lightstudy.lightning_config import lightning_namespace, parse_config
    from lightstudy.spec import spec_from_dict

    spec = spec_from_dict(json.loads(study_spec))
    config = spec.lightning_config()
    parse_config(config, lightning_namespace(config), spec.cli)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
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


# The worker preloads this module into its forkserver (Worker._context, with the study's spec in
# LIGHTSTUDY_WARM_SPEC): importing it there is the call.
warm_forkserver(os.environ.get(WARM_SPEC_VAR))
