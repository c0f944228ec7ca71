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
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lightstudy import __version__
from lightstudy.errors import LightstudyError, StorageError

if TYPE_CHECKING:
    from lightstudy.spec import StudySpec

__all__ = [
    "GpusPerTrialOpt",
    "RunDirOpt",
    "StorageOpt",
    "StudyRunDirOpt",
    "app",
    "console",
    "main",
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

_state = {"debug": False}

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


# --- the storage URL: one rule for every command -----------------------------------------------


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more (DEBUG).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Hyperparameter optimization for PyTorch Lightning, on Optuna.

    Example: lightstudy run studies/digits.yaml --workers 2
    """
    _state["debug"] = debug
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
