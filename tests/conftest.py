"""Shared fixtures: tiny studies on the bundled digits data, temporary storages, the real CLI."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PG_BASE = os.environ.get("LIGHTSTUDY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


# Rough seconds (2 idle cores, -n 2) of the longest tests in files whose tests carry no
# ``slow(seconds=...)`` of their own; a slow test not named anywhere counts as SLOW_SECONDS.
LONG_TESTS = {
    "test_quick_overhead_writes_every_method": 85,
    "test_quick_scaling_rows_and_checks": 35,
    "test_quick_startup_times_every_comparison": 25,
    "test_quick_run_writes_one_row_per_pruner_and_checks_every_spec": 25,
}
SLOW_SECONDS = 20.0


def expected_seconds(item: pytest.Item) -> float:
    """About how long a test runs: its ``slow(seconds=N)`` mark, else LONG_TESTS, else a guess."""
    mark = item.get_closest_marker("slow")
    if mark is None:
        return 1.0
    name = getattr(item, "originalname", item.name)
    return float(mark.kwargs.get("seconds", LONG_TESTS.get(name, SLOW_SECONDS)))


# Session fixtures that cost seconds to build (their rough time): the tests using one go to one
# test process together, which builds it once.
SHARED_FIXTURES = {"finished_study": 15.0}


def _shared_setup(item: pytest.Item) -> tuple[str, ...] | None:
    """What a test shares with others that should run in its process: an expensive session
    fixture, or the module-scoped fixtures of its module (a Slurm cluster, the contract's
    storages). None: nothing."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    session = sorted(name for name in SHARED_FIXTURES if name in info.name2fixturedefs)
    if session:
        return ("session", *session)
    shared = sorted(name for name, defs in info.name2fixturedefs.items() if defs and defs[-1].scope == "module")
    return (item.nodeid.split("::")[0], *shared) if shared else None


def _unit_seconds(unit: list[pytest.Item]) -> float:
    key = _shared_setup(unit[0])
    setup = sum(SHARED_FIXTURES.get(name, 0.0) for name in key or ()) if key and key[0] == "session" else 0.0
    return setup + sum(map(expected_seconds, unit))


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest tests first in each test process's share, their expected time dealt out evenly.

    pytest-xdist's worksteal mode hands process k the k-th of n contiguous parts of this list
    (and an idle process later takes queued tests from a busy one, never a running test). So
    the slow tests go, longest first, each to the part with the least expected time so far
    (the README's study, the longest, starts at once in its own process), tests sharing a costly
    fixture as one, and short ones fill each part to its size: no long test starts late and runs
    alone at the end. In one process: slow tests first, longest first.
    """
    groups: dict[Any, list[pytest.Item]] = {}  # tests sharing a costly fixture stay together
    for item in items:
        key = _shared_setup(item)
        if key is not None or item.get_closest_marker("slow"):
            groups.setdefault(key or item, []).append(item)
    units = [sorted(unit, key=expected_seconds, reverse=True) for unit in groups.values()]
    units.sort(key=_unit_seconds, reverse=True)
    slow = [item for unit in units for item in unit]
    grouped = {id(item) for item in slow}
    fast = [item for item in items if id(item) not in grouped]
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    sizes, left = [], len(items)
    for k in range(n):  # the sizes worksteal splits into
        sizes.append(left // (n - k))
        left -= sizes[-1]
    parts: list[list[pytest.Item]] = [[] for _ in range(n)]
    load = [0.0] * n
    unplaced: list[pytest.Item] = []
    for unit in units:
        open_parts = [k for k in range(n) if len(parts[k]) + len(unit) <= sizes[k]]
        if not open_parts:  # no room left for it whole: its tests fill in first
            unplaced.extend(unit)
            continue
        k = min(open_parts, key=lambda k: load[k])
        parts[k].extend(unit)
        load[k] += _unit_seconds(unit)
    rest = iter(unplaced + fast)
    for part, size in zip(parts, sizes):
        part.extend(next(rest) for _ in range(size - len(part)))
    items[:] = [item for part in parts for item in part] + list(rest)


POLL_INTERVAL = 0.05  # seconds between looks at a condition another process changes


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 120.0,
    what: Callable[[], str] | str = "the condition",
    *,
    proc: subprocess.Popen[str] | None = None,
    interval: float = POLL_INTERVAL,
) -> Any:
    """Poll ``predicate`` until it returns something true, and return that.

    The one way tests wait for another process or thread (a file, a log line, a state in the
    database): never a fixed sleep that hopes the other side is done. Fails with ``what`` after
    ``timeout`` s, or at once (with its output) when ``proc`` exits first.
    """
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"{_said(what)} not reached: the process exited {proc.returncode}\n{out}")
        if time.monotonic() > end:
            raise AssertionError(f"{_said(what)} not reached in {timeout:.0f} s")
        time.sleep(interval)


def _said(what: Callable[[], str] | str) -> str:
    return what() if callable(what) else what


@contextlib.contextmanager
def warm_for_workers(doc: dict[str, Any]) -> Iterator[dict[str, str]]:
    """One warm process for a test's worker processes, as `lightstudy run` starts one for its
    workers: the environment that points a ``lightstudy worker`` at it ($LIGHTSTUDY_WARM)."""
    from lightstudy.spec import spec_from_dict
    from lightstudy.warmserver import start_warm

    tests = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    warm = start_warm(spec_from_dict(doc), env={**os.environ, "PYTHONPATH": path})
    try:
        yield warm.environment()
    finally:
        warm.stop()


def tiny_spec(name: str = "tiny", *, n_trials: int = 3, max_epochs: int = 2, **study: Any) -> dict[str, Any]:
    """A study document that trains in about a second a trial on CPU."""
    doc: dict[str, Any] = {
        "study": {
            "name": name,
            "direction": "maximize",
            "metric": "val_acc",
            "n_trials": n_trials,
            "seed": 0,
            "sampler": {"name": "RandomSampler"},
            "pruner": None,
            "checkpoints": {"keep": 2},
            "heartbeat_interval": 1,
            "grace_period": 3,
            **study,
        },
        "search_space": {
            "model.init_args.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
            "data.init_args.batch_size": {"type": "categorical", "choices": [64, 128]},
        },
        "trainer": {"max_epochs": max_epochs, "accelerator": "cpu", "devices": 1},
        "model": {"class_path": "lightstudy.examples.ConvNet", "init_args": {"channels": 8, "hidden": 32}},
        "data": {"class_path": "lightstudy.examples.DigitsDataModule", "init_args": {"batch_size": 64}},
    }
    return doc


def write_spec(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the test, dropped afterwards (the server must run: CI starts it)."""
    import psycopg

    admin = PG_BASE.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    name = f"ls_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_BASE}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_admin(statement: str) -> None:
    import psycopg

    admin = PG_BASE.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(statement)


class PgClones:
    """Fresh databases cloned from one holding Optuna's empty schema (made by ``open_storage``
    once per test process): cloning is faster than creating the tables, and threads clone the
    next databases and drop used ones while tests run, so a test waits for neither."""

    AHEAD = 2  # clones kept ready (CREATE DATABASE waits for a WAL flush: two overlap that wait)

    def __init__(self) -> None:
        import collections
        from concurrent.futures import ThreadPoolExecutor

        from lightstudy.storage import open_storage

        self.template = f"ls_template_{uuid.uuid4().hex[:10]}"
        _pg_admin(f'CREATE DATABASE "{self.template}"')
        open_storage(f"{PG_BASE}/{self.template}").engine.dispose()  # a template must have no connection
        self._cloner = ThreadPoolExecutor(max_workers=self.AHEAD, thread_name_prefix="pg-clone")
        self._dropper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pg-drop")
        self._ahead = collections.deque(self._cloner.submit(self._clone) for _ in range(self.AHEAD))
        self._drops: list[Any] = []

    def _clone(self) -> str:
        name = f"ls_test_{uuid.uuid4().hex[:10]}"
        _pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    def take(self) -> str:
        """A new database's URL (a clone made ahead), and the next clone started."""
        name = self._ahead.popleft().result()
        self._ahead.append(self._cloner.submit(self._clone))
        return f"{PG_BASE}/{name}"

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self._drops.append(self._dropper.submit(_pg_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        try:
            self._cloner.shutdown(wait=True)
            for ready in self._ahead:
                with contextlib.suppress(Exception):
                    self.drop(f"{PG_BASE}/{ready.result()}")
            self._dropper.shutdown(wait=True)
            for dropped in self._drops:
                dropped.result()  # a database left behind is an error, not a silent leak
        finally:
            _pg_admin(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_clones() -> Iterator[PgClones]:
    clones = PgClones()
    try:
        yield clones
    finally:
        clones.close()


@pytest.fixture
def pg_optuna_url(pg_clones: PgClones) -> Iterator[str]:
    """A fresh PostgreSQL database with Optuna's tables and no study, dropped afterwards."""
    url = pg_clones.take()
    try:
        yield url
    finally:
        pg_clones.drop(url)


class PrivateServer:
    """A throwaway PostgreSQL server of the test's own (initdb on a free port): a test may stop and
    restart it without touching the shared server that the other tests, maybe in parallel, use."""

    def __init__(self, root: Path) -> None:
        import glob
        import shutil

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
        if not found[-1]:
            raise RuntimeError("initdb not found: install the PostgreSQL server (Debian: postgresql)")
        self.bin = Path(found[-1]).parent
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:  # the server refuses to run as root: it runs as the postgres user
            shutil.chown(root, "postgres")
        self._ctl("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()

    def _ctl(self, program: str, *args: str) -> None:
        cmd = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, timeout=120, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivateServer]:
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="lightstudy-pg-"))  # not under tmp_path: postgres must reach it
    server = None
    try:
        server = PrivateServer(root)
        yield server
    finally:
        if server is not None:
            with contextlib.suppress(subprocess.SubprocessError):
                server.stop()
        shutil.rmtree(root, ignore_errors=True)


def cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``lightstudy`` entry point in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("LIGHTSTUDY_STORAGE", None) if env is None or "LIGHTSTUDY_STORAGE" not in env else None
    result = subprocess.run(
        [sys.executable, "-m", "lightstudy", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return _checked(result, args, check)


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``lightstudy ARGS`` in this process: the ``main`` the script calls, with its exit code and
    output, without an interpreter's start-up and torch import (seconds a call). ``cli`` runs the
    real script where the entry point itself is under test; this is for what a command does."""
    from lightstudy.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    try:
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    result = subprocess.CompletedProcess(["lightstudy", *args], code, out.getvalue(), err.getvalue())
    return _checked(result, args, check)


def _checked(
    result: subprocess.CompletedProcess[str], args: tuple[str, ...], check: bool
) -> subprocess.CompletedProcess[str]:
    if check and result.returncode != 0:
        raise AssertionError(
            f"lightstudy {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def run_bench(
    script: str, out: Path, *args: str, timeout: float = 600
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """``python bench/SCRIPT --quick ARGS --out OUT`` from the repository root, as its README runs
    it; asserts it exited 0 and returns the run and the JSON rows it wrote."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick", *args, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _no_env_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTSTUDY_STORAGE", raising=False)


class Finished:
    """A small study that has run to its end (shared by the tests that only read it)."""

    def __init__(self, url: str, run_dir: Path, spec_path: Path, name: str) -> None:
        self.url = url
        self.run_dir = run_dir
        self.spec_path = spec_path
        self.name = name


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """Four deterministic trials of the digits ConvNet, best two checkpoints kept."""
    from lightstudy.spec import spec_from_dict
    from lightstudy.study import create_study
    from lightstudy.worker import Worker

    root = tmp_path_factory.mktemp("finished")
    doc = tiny_spec("finished", n_trials=4, max_epochs=3, checkpoints={"keep": 2})
    doc["trainer"]["deterministic"] = True
    spec_path = write_spec(root / "finished.yaml", doc)
    url = f"sqlite:///{root / 'study.db'}"
    create_study(spec_from_dict(doc), url)
    Worker(url, "finished", run_dir=root / "run", threads=1).run()
    return Finished(url, root / "run", spec_path, "finished")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Dashboard:
    """``lightstudy dashboard`` running in a subprocess; ``get`` fetches its HTTP API."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lightstudy", "dashboard", *args, "--port", str(self.port)],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, timeout: float = 60) -> bytes:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
                    return bytes(r.read())
            except ConnectionError:
                pass
            except OSError as e:
                if "refused" not in str(e).lower():
                    raise
            if time.monotonic() > deadline or self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.poll() is not None and self.proc.stdout else ""
                raise AssertionError(f"dashboard did not answer {path}: {out}")
            time.sleep(0.5)

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """A real S3 API (moto's server mode) on loopback."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    yield f"http://127.0.0.1:{port}"
    server.stop()
