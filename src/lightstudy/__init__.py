"""lightstudy: hyperparameter optimization for PyTorch Lightning, on Optuna.

Light at import time: ``lightstudy --help`` must not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
