"""Where a study's database is: one rule for every command and for the Python API.

The ``--storage`` flag (``storage=``), else ``$LIGHTSTUDY_STORAGE``, else the spec's ``storage``,
else SQLite in the run folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from lightstudy.errors import StorageError

if TYPE_CHECKING:
    from lightstudy.spec import StudySpec

__all__ = ["storage_url", "storage_urls"]


def storage_url(
    flag: str | None,
    *,
    spec: StudySpec | None = None,
    study: str | None = None,
    run_dir: Path | None = None,
) -> str:
    """The study database URL, by one rule: the ``--storage`` flag, else ``$LIGHTSTUDY_STORAGE``,
    else the spec's ``storage``, else SQLite in the run folder.

    Commands given a spec file (validate, create, run) take the run folder from it (``--run-dir``
    already applied); the database there is created when missing. The commands that read a
    study know no spec before they have read it: their run folder is ``run_dir`` (their
    ``--run-dir``), else ``runs/<study>``, and its ``study.db`` must exist, since reading must not
    create an empty database.

    Raises:
        StorageError: nothing names a database (the message says where it looked).
    """
    from lightstudy.storage import ENV_VAR, resolve_url

    if spec is not None:
        return resolve_url(flag, spec.study.storage, spec.run_dir)
    folder = Path(run_dir) if run_dir is not None else (Path("runs") / study if study else None)
    found = folder if folder is not None and (folder / "study.db").exists() else None
    try:
        return resolve_url(flag, None, found)
    except StorageError:
        if folder is None:
            raise
        raise StorageError(
            f"no storage given and no {folder / 'study.db'} here",
            fix=f"pass --storage URL, or --run-dir of the run folder that holds study.db, or set {ENV_VAR}",
        ) from None


def storage_urls(flag: str | None, run_dir: Path | None) -> list[str]:
    """The databases ``status`` lists: the one the flag, ``$LIGHTSTUDY_STORAGE`` or ``--run-dir``
    names, else every ``runs/*/study.db`` here.

    Raises:
        StorageError: none is named and there is none here.
    """
    from lightstudy.storage import ENV_VAR, default_url

    if flag or os.environ.get(ENV_VAR) or run_dir is not None:
        return [storage_url(flag, run_dir=run_dir)]
    urls = [default_url(path.parent) for path in sorted(Path("runs").glob("*/study.db"))]
    if not urls:
        raise StorageError(
            "no storage given and no runs/*/study.db here",
            fix=f"pass --storage URL, or --run-dir of a run folder, or set {ENV_VAR}",
        )
    return urls
