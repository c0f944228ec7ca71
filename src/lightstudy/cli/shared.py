"""The floor every command stands on: the Typer app, the shared options, the storage resolver and
:func:`main`, the one place where errors become one red line on stderr and exit code 2.

Command modules (:mod:`lightstudy.cli.studies`, :mod:`lightstudy.cli.results`) import this module
and register their commands on :data:`app`; they never import each other. Heavy imports happen
inside the commands, so ``lightstudy --help`` stays instant.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from lightstudy import __version__
from lightstudy.errors import LightstudyError
from lightstudy.locations import storage_url, storage_urls

__all__ = [
    "GpusPerTrialOpt",
    "RunDirOpt",
    "StorageOpt",
    "StudyRunDirOpt",
    "app",
    "console",
    "main",
    "quiet_lightning",
    "storage_url",
    "storage_urls",
]

app = typer.Typer(
    name="lightstudy",
    help="Hyperparameter optimization for PyTorch Lightning, on Optuna.\n\n"
    "Example: lightstudy run studies/digits.yaml --workers 2",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False, "verbose": False}

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Study database URL (default: $LIGHTSTUDY_STORAGE, else the "
        "spec's, else sqlite:///runs/<study>/study.db).",
        show_default=False,
    ),
]
GpusPerTrialOpt = Annotated[
    int | None,
    typer.Option(
        "--gpus-per-trial",
        help="Devices one trial runs on (DDP), when trainer.devices does not say (default: from the spec).",
        show_default=False,
    ),
]
RunDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--run-dir",
        help="Run folder for checkpoints, logs and the SQLite database when no --storage "
        "(default: the spec's, runs/<study>).",
        show_default=False,
    ),
]
# The commands that read a study: the run folder is where the database is found when no
# --storage names one, so `lightstudy run FILE --run-dir X` is read back with `--run-dir X`.
StudyRunDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--run-dir",
        help="The study's run folder: its study.db when no --storage (default: runs/<study>), "
        "its checkpoints (default: the spec's).",
        show_default=False,
    ),
]


# --- output, logging, errors -------------------------------------------------------------------


def console(stderr: bool = False) -> Any:
    """A rich console on stdout (or stderr) that does not squeeze piped output to 80 columns."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (logs, CI, grep) gets room for wide tables instead of 80 columns.
    width = None if stream.isatty() else 220
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=width)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lightstudy {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Log more (DEBUG), with Lightning's INFO lines and all its warnings."),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Hyperparameter optimization for PyTorch Lightning, on Optuna.

    Example: lightstudy run studies/digits.yaml --workers 2
    """
    from lightstudy.lightning_config import VERBOSE_VAR

    # A worker started by `lightstudy --verbose run` inherits the variable: it logs more too.
    verbose = verbose or os.environ.get(VERBOSE_VAR, "") not in ("", "0")
    _state["debug"] = debug
    _state["verbose"] = verbose
    if verbose:
        os.environ[VERBOSE_VAR] = "1"
    from lightstudy.project import use_project_folder

    # User classes import from here, in this process and (through PYTHONPATH) in every child.
    use_project_folder()
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(console=console(stderr=True), show_path=False, markup=False, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # log files: one line per record
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("lightstudy").setLevel(logging.DEBUG if verbose else logging.INFO)
    import warnings

    warnings.filterwarnings("ignore", message=".*experimental.*")
    if not {"-h", "--help"} & set(sys.argv):
        import optuna  # its INFO lines ("A new study created") would interleave with ours

        optuna.logging.set_verbosity(optuna.logging.WARNING)


def quiet_lightning() -> None:
    """Lightning's lines once each, its INFO lines and deprecations only with ``--verbose``."""
    from lightstudy.lightning_config import quiet_lightning as quiet

    quiet(verbose=_state["verbose"])


def script() -> None:
    """The ``lightstudy`` script and ``python -m lightstudy``: :func:`main`, then the exit.

    A command that imported torch (validate, create, test, predict, best --export, init) would
    then wait for the interpreter's teardown, freeing every module's objects: 1.3-1.7 s on 2
    cores, a quarter of a ``validate``. So, where torch is imported, the process ends as an
    ordinary exit would up to that teardown (its other threads joined, its ``atexit`` handlers
    run: a logger's last upload, this process's warm process stopped; output flushed) and then
    with ``os._exit``. Called in-process (tests, a notebook), :func:`main` exits nothing.
    """
    code = main()
    if "torch" not in sys.modules:
        sys.exit(code)
    from lightstudy.exiting import exit_without_teardown

    exit_without_teardown(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightstudy`` script; returns the exit code.

    The commands are registered on :data:`app` by importing :mod:`lightstudy.cli`, which any
    import of this module does first.
    """
    try:
        app(args=argv, prog_name="lightstudy")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except LightstudyError as e:
        if _state["debug"]:
            traceback.print_exc()
        from rich.markup import escape

        console(stderr=True).print(f"[bold red]error:[/bold red] {escape(' '.join(str(e).split()))}")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0
