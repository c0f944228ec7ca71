"""lightstudy: hyperparameter optimization for PyTorch Lightning, on Optuna.

From Python (a notebook, a script)::

    import lightstudy

    study = lightstudy.run("studies/digits.yaml", workers=2)   # -> lightstudy.Study
    study.best_value, study.best_params, study.export("exported/")
    study = lightstudy.load("digits")                          # an existing study

Light at import time: ``import lightstudy`` and ``lightstudy --help`` import neither torch nor
Lightning; the names below load their module on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lightstudy.api import Study, WorkersFailed, create, load, run, validate
    from lightstudy.errors import LightstudyError, SpecError
    from lightstudy.spec import StudySpec, load_spec

# Public name -> the module that defines it.
_LAZY = {
    "Study": "lightstudy.api",
    "WorkersFailed": "lightstudy.api",
    "create": "lightstudy.api",
    "load": "lightstudy.api",
    "run": "lightstudy.api",
    "validate": "lightstudy.api",
    "LightstudyError": "lightstudy.errors",
    "SpecError": "lightstudy.errors",
    "StudySpec": "lightstudy.spec",
    "load_spec": "lightstudy.spec",
}

__all__ = [
    "LightstudyError",
    "SpecError",
    "Study",
    "StudySpec",
    "WorkersFailed",
    "__version__",
    "create",
    "load",
    "load_spec",
    "run",
    "validate",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightstudy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
