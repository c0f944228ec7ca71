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
import warnings
from pathlib import Path
from typing import Any

WARM_SPEC_VAR = "LIGHTSTUDY_WARM_SPEC"  # the study's spec (JSON) the worker passes to its forkserver

_TINY = {
    "study": {"name": "warm-up", "metric": "val_acc", "n_trials": 1, "pruner": None},
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 1,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
    },
    "model": {"class_path": "lightstudy.examples.ConvNet", "init_args": {"channels": 4, "hidden": 8}},
    "data": {"class_path": "lightstudy.examples.DigitsDataModule", "init_args": {"batch_size": 8}},
}


def _warm_up() -> None:
    import torch

    from lightstudy.lightning_config import lightning_namespace, parse_config

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
    study: Any = os.environ.get(WARM_SPEC_VAR)
    if study:
        config = spec_from_dict(json.loads(study)).lightning_config()
        parse_config(config, lightning_namespace(config))


def _quietly() -> None:
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")
    loggers = [logging.getLogger(n) for n in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            _warm_up()
    except Exception:  # a warm-up that fails costs the first trial's speed, nothing else
        pass
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


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

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for _name in PRELOAD:
        importlib.import_module(_name)
    _quietly()
