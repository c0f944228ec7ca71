"""The warm process itself (``python -m lightstudy._warm``; :mod:`lightstudy.warmserver` starts
it and talks to it): what it does to itself before it forks trials, then serving the forks.

Importing is only half of a warm start: a process's first ``LightningCLI`` parse of a class, first
``Trainer`` set-up, TensorBoard logger and training step fill jsonargparse's and Lightning's
caches and initialize torch's kernels and allocator, which costs a fresh process about a second.
So the warm process imports :data:`PRELOAD` and the study's classes, parses the study's own
config through its own ``cli:`` class (or checks the whole spec, for ``lightstudy run``), and,
once it is idle, runs lightstudy's trial path once on the CPU (the bundled digits, one step,
into a temporary folder). It never touches CUDA: the trial processes forked from it may still
use the GPU. Each stage is logged with its seconds; a failed warm-up stage costs speed, never a
trial's result.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError, error_fields
from lightstudy.warmserver import _EARLY_LOG, _INT, _LOG_FORMAT, Setup, _Fd, _Request

if TYPE_CHECKING:
    from lightstudy.spec import StudySpec

__all__ = [
    "PRELOAD",
    "exit_now",
    "import_preload",
    "main",
    "parse_study_config",
    "run_tiny_trial",
    "source_files",
    "user_modules",
    "warm_stage",
]

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
    "pytorch_lightning",  # each trial's quiet_lightning() imports it (100 ms a trial when not here)
    "optuna",
    "optuna_integration",
    "optuna_integration.pytorch_lightning",
    "lightstudy.callbacks",
    "lightstudy.components",
    "lightstudy.lightning_config",
    "lightstudy.trial",
)


def user_modules(spec: StudySpec) -> list[str]:
    """The modules of the study's model and data classes (imported once, by the warm process)."""
    modules = []
    for section in ("model", "data"):
        value = spec.config.get(section)
        if isinstance(value, dict) and isinstance(value.get("class_path"), str):
            modules.append(value["class_path"].rpartition(".")[0])
    return modules


def import_preload(spec: StudySpec | None = None) -> None:
    """Import :data:`PRELOAD` (and the study's modules: one that fails to import is left to the
    trial, which reports it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            importlib.import_module(name)
        for name in user_modules(spec) if spec is not None else []:
            try:
                importlib.import_module(name)
            except Exception as e:
                _log.warning("warm process: could not import %s (%s: %s)", name, type(e).__name__, e)


def warm_stage(name: str, run: Any, seconds: dict[str, float]) -> None:
    """Run one warm-up stage quietly; its seconds go to ``seconds``, a failure to the log (WARNING)."""
    start = time.perf_counter()
    try:
        with quiet_lightning():
            run()
    except Exception as e:  # a warm-up that fails costs the trials' speed, nothing else
        _log.warning("warm-up: the %s failed, trials start cold (%s: %s)", name, type(e).__name__, e)
    else:
        seconds[name] = time.perf_counter() - start


def run_tiny_trial() -> None:
    """lightstudy's own trial path once: the bundled digits, one step on the CPU, a temporary folder."""
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


def source_files() -> dict[str, int]:
    """The Python files this process imported from outside the interpreter's own and its
    installed packages (the user's modules, an editable install's), with their modification
    times: a starter that reuses this process checks them (:func:`lightstudy.warmserver.shared_warm`)."""
    installed = {sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    prefixes = tuple(os.path.join(path, "") for path in installed if path)
    files: dict[str, int] = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not path.endswith(".py") or path.startswith(prefixes):
            continue
        with contextlib.suppress(OSError):
            files[path] = os.stat(path).st_mtime_ns
    return files


def parse_study_config(spec: StudySpec) -> None:
    """The study's own config through its own ``cli:`` class (its links included), as a trial
    parses it: the parser every trial reuses is built here, and the versions a trial records read."""
    from lightstudy.lightning_config import lightning_namespace, warm_parser
    from lightstudy.trial import _versions

    config = spec.lightning_config()
    warm_parser(config, spec.cli)
    _versions(lightning_namespace(config))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
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


# --- the warm process itself ----------------------------------------------------------------------


@dataclass
class _Server:
    listener: socket.socket
    setup: Setup
    wakeup: tuple[int, int]
    children: dict[int, socket.socket] = field(default_factory=dict)
    warmed: bool = False
    warming: bool = False  # in the warm-up trial: SIGCHLD reaps at once (the loop is not running)
    stopping: bool = False

    def serve(self) -> None:
        """Fork what workers ask for; warm up when idle; reap children; until stdin closes or SIGTERM."""
        stdin = sys.stdin.buffer
        while not self.stopping:
            timeout = None if self.warmed else 0.0
            ready, _, _ = select.select([self.listener, stdin, self.wakeup[0]], [], [], timeout)
            if not ready:  # idle, not warmed yet: warm up now (a request waiting would have been served)
                self.warm_up()
                continue
            if self.wakeup[0] in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wakeup[0], 4096)
                self.reap()
            if self.listener in ready:
                self.accept()
            if stdin in ready and not os.read(stdin.fileno(), 4096):
                _log.info("warm process: its starter is gone; stopping")
                break
        self.reap()

    def warm_up(self) -> None:
        """The warm-up trial; meanwhile a trial process that exits is reaped at once (SIGCHLD's
        handler calls :meth:`reap`): its worker, waiting for the exit code before its next
        trial, never waits for the warm-up."""
        seconds: dict[str, float] = {}
        self.warming = True
        try:
            self.reap()  # one that exited just before
            warm_stage("trial path", run_tiny_trial, seconds)
        finally:
            self.warming = False
        self.warmed = True
        _log.info("warm-up: %s", ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()) or "failed")

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.setblocking(True)
        try:
            head, fds, _, _ = socket.recv_fds(conn, _INT.size, 8)
            if len(head) < _INT.size:
                rest = _read_exact(conn, _INT.size - len(head))
                head += rest or b""
            size = int(_INT.unpack(head)[0])
            payload = _read_exact(conn, size)
        except (OSError, struct.error) as e:
            _log.warning("warm process: a broken request (%s)", e)
            conn.close()
            return
        if payload is None:
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        started = time.perf_counter()
        # A signal for the child between the fork and its own handlers waits (blocked), and then
        # meets the default action, not this process's handler.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        pid = os.fork()
        if pid == 0:
            self._child(conn, payload, fds, blocked)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(_INT.pack(pid))
        except OSError:  # the worker went away meanwhile: the child sees its pipe broken and dies
            conn.close()
            return
        self.children[pid] = conn
        _log.info("forked trial process %d in %.1f ms", pid, (time.perf_counter() - started) * 1000)

    def _child(self, conn: socket.socket, payload: bytes, fds: list[int], mask: set[int]) -> None:
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for sock in (self.listener, conn, *self.children.values()):
                sock.close()
            for fd in self.wakeup:
                os.close(fd)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            *passed, out, err = fds
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.close(out)
            os.close(err)
            request: _Request = pickle.loads(payload)
            os.environ.clear()
            os.environ.update(request.env)  # the worker's: CUDA_VISIBLE_DEVICES, threads, ...
            os.chdir(request.cwd)
            args = [Connection(passed[a.index]) if isinstance(a, _Fd) else a for a in request.args]
            request.target(*args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def reap(self) -> None:
        """Tell each exited trial process's worker its exit code (only trial processes are waited
        for: a process the warm-up trial started is its own to wait for)."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 255 << 8  # waited for elsewhere: its code is lost
            if done == 0:
                continue
            conn = self.children.pop(pid, None)
            if conn is None:  # reaped meanwhile (SIGCHLD's handler ran inside this loop)
                continue
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            with contextlib.suppress(OSError):
                conn.sendall(_INT.pack(code))
            conn.close()


def _read_exact(conn: socket.socket, size: int) -> bytes | None:
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(size - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _verdict(out: IO[str], **fields: Any) -> bool:
    """Tell the starter whether this process is ready; False when the starter is gone already
    (killed while this process imported): then there is no one to serve, nor to show a traceback."""
    try:
        out.write(json.dumps(fields) + "\n")
        out.flush()
    except BrokenPipeError:
        return False
    return True


def main(address: str) -> int:
    """The warm process: set up (see the module's doc), then serve until told to stop."""
    stdin = sys.stdin.buffer
    head = stdin.read(_INT.size)
    setup: Setup = pickle.loads(stdin.read(int(_INT.unpack(head)[0])))
    sys.path[:] = [*setup.sys_path, *(p for p in sys.path if p not in setup.sys_path)]
    logging.basicConfig(level=logging.INFO if setup.verbose else logging.WARNING, format=_LOG_FORMAT)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)  # at once: a worker that asks early waits in the backlog
    listener.listen(128)
    try:
        return _set_up_and_serve(setup, listener, address)
    finally:  # however it ends: ready or not, told to stop or its starter gone
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(address)


def _set_up_and_serve(setup: Setup, listener: socket.socket, address: str) -> int:
    """:func:`main` once its socket listens: import, check, say ready, serve; the exit code."""
    # The verdict gets stdout to itself: anything printed while importing goes to stderr.
    status = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    import_preload(setup.spec)
    seconds["import"] = time.perf_counter() - start
    start = time.perf_counter()
    if setup.check:
        from lightstudy.lightning_config import check_spec

        try:
            with quiet_lightning():
                check_spec(setup.spec)
        except LightstudyError as e:
            _verdict(status, ok=False, **error_fields(e))
            return 2
        seconds["check"] = time.perf_counter() - start
    warm_stage("study config", lambda: parse_study_config(setup.spec), seconds)
    if setup.log is not None:  # from here its output goes to the run's log, what it wrote so far first
        Path(setup.log).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(setup.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        early = Path(address).parent / _EARLY_LOG
        if early.exists():
            os.write(fd, early.read_bytes())
        os.dup2(fd, 2)
        os.close(fd)
    if not _verdict(status, ok=True, seconds=seconds, pid=os.getpid(), sources=source_files()):
        _log.info("warm process: its starter went away before it was ready; stopping")
        return 0
    status.close()
    os.dup2(2, 1)  # the log too, if it moved
    _log.info(
        "warm process %d ready at %s: %s",
        os.getpid(),
        address,
        ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items()),
    )
    wakeup = os.pipe()
    for fd in wakeup:
        os.set_blocking(fd, False)
    server = _Server(listener, setup, wakeup)

    def on_term(signum: int, frame: Any) -> None:
        server.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the launcher's to pass on

    def on_child(signum: int, frame: Any) -> None:  # the loop wakes through the wakeup fd
        if server.warming:
            server.reap()

    signal.signal(signal.SIGCHLD, on_child)
    signal.set_wakeup_fd(wakeup[1])
    server.serve()
    return 0


def exit_now(code: int) -> None:
    """End the warm process with ``code``, its output flushed, without the interpreter's
    teardown: with torch and Lightning imported, freeing every module's objects takes about
    1.3 s on 2 cores, and ``lightstudy run`` (and a worker that started its own) waits for this
    process's exit before it prints its result. Nothing here needs the teardown: its trial
    processes are reaped, its socket is removed, and it never touched CUDA."""
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # run as lightstudy._warm (``python -m``): the server, its module imported once
    import sys

    from lightstudy._warm import exit_now as _exit_now
    from lightstudy._warm import main as _main

    _exit_now(_main(sys.argv[1]))  # an exception out of main: its traceback, and the usual exit
