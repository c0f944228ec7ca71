"""Imported once by each worker's forkserver, so every trial process starts with these loaded."""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import lightning.pytorch
    import lightning.pytorch.cli  # noqa: F401
    import optuna  # noqa: F401
    import optuna_integration  # noqa: F401
    import torch  # noqa: F401
    import torchmetrics  # noqa: F401

    import lightstudy.callbacks
    import lightstudy.components
    import lightstudy.lightning_config
    import lightstudy.trial  # noqa: F401
