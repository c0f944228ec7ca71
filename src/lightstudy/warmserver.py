"""The warm process: imports torch, Lightning and the study's classes once, and forks every trial.

``lightstudy run`` starts one for all its local workers (so N workers start in the time of one);
a ``lightstudy worker`` started on its own starts its own. Each trial is still a process of its
own, forked from the warm process: GPU memory, leaks and crashes stay with the trial. The warm
process never touches CUDA (``PYTORCH_NVML_BASED_CUDA_CHECK=1``; a trial sees the GPUs of the
worker that asked for it, whose environment it takes).

How it talks (a unix socket in a folder only this user can open: requests are pickles):

- start: ``python -m lightstudy._warm ADDRESS`` (its code: :mod:`lightstudy._warm`) reads its
  :class:`Setup` (pickled, after an 8-byte length) from stdin, binds ADDRESS, imports, then checks the whole spec
  (``Setup.check``: ``lightstudy run``'s validation, paid here instead of in the CLI) or only
  parses its config, and writes one JSON line on stdout: ``{"ok": true, ...}`` or ``{"ok":
  false, "message": ..., "fix": ...}`` (the :class:`~lightstudy.errors.LightstudyError` the CLI
  prints). When idle it runs the warm-up trial (:func:`lightstudy._warm.run_tiny_trial`), never
  before a request that is already waiting. It exits when its stdin closes (whoever started it
  is gone) or on SIGTERM.
- a trial process: a worker connects and sends an 8-byte length with the file descriptors the
  child gets (its pipe to the worker, the worker's stdout and stderr), then the pickled
  :class:`_Request`. The warm process forks; it answers the child's pid (8 bytes), then, when
  the child has exited, its exit code (8 bytes, signed: ``-N`` for signal N, as
  ``multiprocessing`` reports it), and closes the connection.

:class:`WarmContext` is the worker's side: the ``Pipe``/``Process`` pair that
:func:`lightstudy.ranks.run_processes` takes from a multiprocessing context.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError, error_from

if TYPE_CHECKING:
    from lightstudy.spec import StudySpec

__all__ = [
    "ADDRESS_VAR",
    "Setup",
    "WarmContext",
    "WarmProcess",
    "WarmServer",
    "shared_warm",
    "start_warm",
    "stop_shared",
]

ADDRESS_VAR = "LIGHTSTUDY_WARM"  # the launcher's warm process, for its workers (unset: a worker starts its own)
GONE = 255  # a trial process's exit code when the warm process vanished before reporting it
_INT = struct.Struct("!q")
_EARLY_LOG = "start.log"  # beside the socket: the warm process's output until it is ready
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """What the warm process is told at its start."""

    spec: StudySpec
    check: bool = False  # check the whole spec (lightning_config.check_spec) and report its error
    log: str | None = None  # once ready, its output goes here (None: it keeps its stderr)
    verbose: bool = False  # INFO lines in its log
    # Where its starter imports from (sys.path: the project folder, a notebook's or a test's own
    # entries), so the warm process and its trials import the user's classes as the starter
    # does, as a multiprocessing child is given its parent's sys.path.
    sys_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Request:
    target: Any
    args: tuple[Any, ...]
    env: dict[str, str]
    cwd: str


@dataclass(frozen=True)
class _Fd:
    """Stands in a request's args for the connection passed as the request's ``index``-th fd."""

    index: int


# --- the worker's side ------------------------------------------------------------------------


class WarmContext:
    """A trial process from the warm process at ``address``, as ``ctx.Process`` of multiprocessing."""

    def __init__(self, address: str) -> None:
        self.address = address

    @staticmethod
    def Pipe(duplex: bool = True) -> tuple[Connection, Connection]:
        from multiprocessing import Pipe

        return Pipe(duplex)

    def Process(self, target: Any, args: tuple[Any, ...] = (), name: str | None = None) -> WarmProcess:
        return WarmProcess(self.address, target, args, name)


class WarmProcess:
    """A process forked by the warm process: ``pid``, ``exitcode``, ``sentinel``, ``is_alive``,
    ``join``, ``kill``, ``terminate`` and ``close`` as a ``multiprocessing.Process`` has them."""

    def __init__(self, address: str, target: Any, args: tuple[Any, ...], name: str | None = None) -> None:
        self.address = address
        self.name = name
        self._target = target
        self._args = args
        self.pid: int | None = None
        self.exitcode: int | None = None
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Ask the warm process for the child; returns once it is forked (its pid is known).

        Raises:
            LightstudyError: the warm process cannot be reached.
        """
        fds: list[int] = []
        args: list[Any] = []
        for arg in self._args:
            if isinstance(arg, Connection):
                args.append(_Fd(len(fds)))
                fds.append(arg.fileno())
            else:
                args.append(arg)
        fds += [1, 2]  # the child's output goes where the worker's does until it opens its trial.log
        payload = pickle.dumps(_Request(self._target, tuple(args), dict(os.environ), os.getcwd()))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.address)
            socket.send_fds(sock, [_INT.pack(len(payload))], fds)
            sock.sendall(payload)
            pid = _read_int(sock)
        except OSError as e:
            sock.close()
            raise _gone(self.address, e) from e
        if pid is None:
            sock.close()
            raise _gone(self.address, None)
        self.pid, self._sock = pid, sock

    @property
    def sentinel(self) -> int:
        """Readable once the child has exited (its exit code, or the warm process gone)."""
        assert self._sock is not None, "not started"
        return self._sock.fileno()

    def _collect(self, timeout: float | None) -> None:
        if self.exitcode is not None or self._sock is None:
            return
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return
        code = _read_int(self._sock)
        if code is None:  # the warm process is gone: so is the child's reaper; stop the child too
            _log.error("the warm process at %s is gone; trial process %s stopped", self.address, self.pid)
            self.kill()
            code = GONE
        self.exitcode = code

    def is_alive(self) -> bool:
        self._collect(0)
        return self.pid is not None and self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        self._collect(timeout)

    def _signal(self, signum: int) -> None:
        if self.pid is not None and self.exitcode is None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _read_int(sock: socket.socket) -> int | None:
    data = b""
    while len(data) < _INT.size:
        chunk = sock.recv(_INT.size - len(data))
        if not chunk:
            return None
        data += chunk
    return int(_INT.unpack(data)[0])


def _gone(address: str, error: OSError | None) -> LightstudyError:
    why = f" ({error})" if error else ""
    return LightstudyError(
        f"the warm process at {address} that forks the trial processes is not answering{why}",
        fix="see its log (<run dir>/workers/warm.log under `lightstudy run`), then start the run again",
    )


# --- starting and stopping one ------------------------------------------------------------------


class WarmServer:
    """A started warm process: :meth:`ready` waits for its verdict, :meth:`stop` ends it."""

    def __init__(self, process: subprocess.Popen[bytes], folder: Path, early_log: Path) -> None:
        self.process = process
        self.folder = folder
        self.address = str(folder / "warm.sock")
        self._early_log = early_log
        self.seconds: dict[str, float] | None = None
        self.sources: dict[str, int] = {}  # the source files it imported, with their mtimes

    @property
    def pid(self) -> int:
        return self.process.pid

    def environment(self) -> dict[str, str]:
        """What a worker's environment needs to fork its trials here (:data:`ADDRESS_VAR`)."""
        return {ADDRESS_VAR: self.address}

    def ready(self) -> dict[str, float]:
        """Wait until it has imported and checked the spec; returns its seconds per stage.

        Raises:
            LightstudyError: the spec's error, as ``lightstudy validate`` words it; or the warm
                process exited first (with the end of its output).
        """
        if self.seconds is not None:
            return self.seconds
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        try:
            verdict = json.loads(line) if line else None
        except ValueError:
            verdict = None
        if not isinstance(verdict, dict):
            code = self.process.wait()
            tail = (
                self._early_log.read_text(errors="replace").strip().splitlines()[-5:]
                if self._early_log.exists()
                else []
            )
            raise LightstudyError(
                f"the warm process exited with code {code} before it was ready: {' | '.join(tail) or 'no output'}",
                fix="run `lightstudy validate` on the spec to see what fails",
            )
        if not verdict.get("ok"):
            raise error_from(verdict)  # of its own class: a SpecError stays one
        self.seconds = dict(verdict.get("seconds") or {})
        self.sources = dict(verdict.get("sources") or {})
        return self.seconds

    def changed_sources(self) -> list[str]:
        """The source files it imported that changed (or went) since: its trials would run the old code."""
        changed = []
        for path, mtime in self.sources.items():
            try:
                if os.stat(path).st_mtime_ns != mtime:
                    changed.append(path)
            except OSError:
                changed.append(path)
        return changed

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """End it (its trial processes should be gone by then) and remove its folder; its exit code."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.process.returncode


# This process's own warm process for its in-process workers (a notebook, a test, `lightstudy
# worker`): (the pid that started it, the sys.path it imports from, it).
_shared: tuple[int, tuple[str, ...], WarmServer] | None = None


def shared_warm(spec: StudySpec) -> WarmServer:
    """This process's warm process for its workers: started by the first (for ``spec``) and kept
    for the next ones, so a notebook's or a script's second study starts at once.

    A new one replaces it when it is gone, when this process's ``sys.path`` changed (a module
    name could mean another file), or when a source file it imported changed since (its trials
    would run the old code: a notebook's edited model). The study's classes it did not import
    are imported by each trial. It stops when this process exits.
    """
    global _shared
    path = tuple(sys.path)
    if _shared is not None:
        pid, shared_path, warm = _shared
        if pid != os.getpid():  # a forked copy of this module: that process is its starter's, not ours
            _shared = None
        else:
            why = _unusable(warm, shared_path, path)
            if why is None:
                return warm
            _log.info("a new warm process: %s", why)
            warm.stop()
            _shared = None
    warm = start_warm(spec)
    _shared = (os.getpid(), path, warm)
    return warm


def _unusable(warm: WarmServer, shared_path: tuple[str, ...], path: tuple[str, ...]) -> str | None:
    if not warm.alive():
        return "the last one exited"
    if shared_path != path:
        return "sys.path changed"
    try:
        warm.ready()
    except LightstudyError as e:
        return f"the last one failed ({e.message})"
    changed = warm.changed_sources()
    return f"{changed[0]} changed" if changed else None


def stop_shared() -> None:
    """Stop this process's shared warm process, if it has one (at exit; a test's clean-up)."""
    global _shared
    if _shared is not None and _shared[0] == os.getpid():
        _shared[2].stop()
    _shared = None


atexit.register(stop_shared)  # a no-op in a process that never started one


def start_warm(
    spec: StudySpec, *, check: bool = False, log: str | Path | None = None, env: dict[str, str] | None = None
) -> WarmServer:
    """Start a warm process for ``spec`` (it imports at once; :meth:`WarmServer.ready` waits for it).

    Its socket is in a new private folder (0700) under the temporary folder: a unix socket's path
    must stay under ~100 characters, which a run folder need not. ``log``: where its output goes
    once it is ready (None: this process's stderr from the start).
    """
    folder = Path(tempfile.mkdtemp(prefix="lightstudy-warm-"))
    early_log = folder / _EARLY_LOG
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # "is there a GPU?" without initializing CUDA
    verbose = run_env.get("LIGHTSTUDY_VERBOSE", "") not in ("", "0")
    setup = Setup(
        spec, check=check, log=str(log) if log is not None else None, verbose=verbose, sys_path=tuple(sys.path)
    )
    stderr: Any = None
    if log is not None:
        stderr = open(early_log, "wb")  # noqa: SIM115 (the child holds it)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "lightstudy._warm", str(folder / "warm.sock")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=run_env,
            start_new_session=True,  # a Ctrl-C reaches the launcher, which stops workers first
        )
    finally:
        if stderr is not None:
            stderr.close()
    assert process.stdin is not None
    payload = pickle.dumps(setup)
    process.stdin.write(_INT.pack(len(payload)) + payload)
    process.stdin.flush()  # stdin stays open: its end tells the warm process that we are gone
    return WarmServer(process, folder, early_log)
