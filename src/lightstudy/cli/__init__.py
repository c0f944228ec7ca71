"""The ``lightstudy`` command line.

:mod:`lightstudy.cli.shared` holds the Typer app, the shared options, the storage resolver and
:func:`main` (errors become one red line and exit code 2; ``--debug`` shows the traceback), run by
:func:`script` (the ``lightstudy`` script, ``python -m lightstudy``), which exits without the
interpreter's teardown where torch was imported. The
command modules register their commands on that app and import nothing from each other:
:mod:`lightstudy.cli.studies` (init, validate, create, run, worker, enqueue, proxy, dashboard) and
:mod:`lightstudy.cli.results` (status, best, test, predict, reproduce, report).
"""

from __future__ import annotations

# Importing a command module registers its commands; --help lists them in this order.
from lightstudy.cli import studies  # noqa: F401

# isort: split
from lightstudy.cli import results  # noqa: F401
from lightstudy.cli.shared import app, main, script

__all__ = ["app", "main", "script"]
