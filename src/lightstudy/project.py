"""The project folder imports: user classes are found in the current folder, as a LightningCLI
script finds them beside it.

A LightningCLI script, ``python -m``, pytest and Hydra all import from the folder a researcher
works in; the ``lightstudy`` console script does not (Python puts the script's own folder on
``sys.path``, not the current one). :func:`use_project_folder` puts the current folder, and the
study file's folder when it differs, first on ``sys.path`` of this process and first on
``PYTHONPATH`` of its environment, so the workers it starts, their forkservers and every trial
process inherit it. ``LIGHTSTUDY_NO_PROJECT_PATH=1`` turns it off (then only installed packages
and the user's own ``PYTHONPATH`` import).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["OFF_VAR", "project_folders", "searched", "use_project_folder"]

OFF_VAR = "LIGHTSTUDY_NO_PROJECT_PATH"  # "1": do not add the project folder to sys.path/PYTHONPATH

_added: list[Path] = []  # the folders this process put on sys.path, for import errors


def _off() -> bool:
    return os.environ.get(OFF_VAR, "").strip().lower() not in ("", "0", "false", "no")


def project_folders(study_file: str | Path | None = None) -> list[Path]:
    """The folders user classes import from: the current folder, then the study file's folder."""
    folders = [Path.cwd().resolve()]
    if study_file is not None:
        parent = Path(study_file).resolve().parent
        if parent not in folders:
            folders.append(parent)
    return folders


def use_project_folder(study_file: str | Path | None = None) -> list[Path]:
    """Put the project folders first on ``sys.path`` and on ``$PYTHONPATH`` (for child processes).

    Idempotent; returns the folders added (none when ``LIGHTSTUDY_NO_PROJECT_PATH=1``).
    """
    if _off():
        return []
    folders = project_folders(study_file)
    entries = [str(f) for f in folders]
    for entry in reversed(entries):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([*[e for e in entries if e not in current], *current])
    _added.extend(f for f in folders if f not in _added)
    return folders


def searched() -> str:
    """Where a module was looked for, for an import error: the project folders and the rest."""
    if _off():
        return f"$PYTHONPATH and installed packages (the project folder is off: {OFF_VAR}=1)"
    if not _added:
        return "sys.path ($PYTHONPATH and installed packages)"
    return f"{', '.join(map(str, _added))}, $PYTHONPATH and installed packages"
