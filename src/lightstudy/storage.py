"""The study database: Optuna's RDBStorage, set up for many workers, and the claim lock.

SQLite (the embedded default) gets WAL and a busy timeout so several local workers share one
file; PostgreSQL gets pre-ping and small bounded pools so many workers on many machines do not
exhaust the server. URLs are shown with the password hidden, everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lightstudy.errors import StorageError

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

    from lightstudy.spec import StudySettings

__all__ = [
    "ENV_VAR",
    "beat",
    "claim_lock",
    "configure_heartbeat",
    "connection_error",
    "db_error_text",
    "default_url",
    "normalize_url",
    "open_storage",
    "record_attr",
    "redact",
    "resolve_url",
    "retry_db",
    "sqlite_path",
]

ENV_VAR = "LIGHTSTUDY_STORAGE"
SQLITE_BUSY_TIMEOUT = 60.0  # seconds a SQLite writer waits for the lock before failing
PROXY_WAIT_SECONDS = 30.0  # seconds a client waits for `lightstudy proxy` to answer before failing
POOL_SIZE = 2  # connections a process keeps open to PostgreSQL (workers need 1-2)
POOL_OVERFLOW = 4  # extra connections a burst may open, closed when returned
POOL_RECYCLE = 1800  # seconds before a pooled connection is replaced

_log = logging.getLogger(__name__)
T = TypeVar("T")


def default_url(run_dir: str | Path) -> str:
    """The embedded default: a SQLite file in the study's run folder."""
    return f"sqlite:///{Path(run_dir) / 'study.db'}"


def resolve_url(flag: str | None, spec_storage: str | None, run_dir: str | Path | None) -> str:
    """The storage URL: the ``--storage`` flag, else ``LIGHTSTUDY_STORAGE``, else the spec's,
    else SQLite in the run folder.

    Raises:
        StorageError: nothing gives a URL (no flag, variable, spec or run folder).
    """
    for url in (flag, os.environ.get(ENV_VAR), spec_storage):
        if url:
            return url
    if run_dir is None:
        raise StorageError(
            "no storage given",
            fix=f"pass --storage URL (e.g. sqlite:///runs/NAME/study.db) or set {ENV_VAR}",
        )
    return default_url(run_dir)


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: hide anything between ':' and '@'
        head, sep, tail = url.rpartition("@")
        if not sep:
            return url
        scheme, _, auth = head.partition("://")
        user = auth.split(":", 1)[0]
        return f"{scheme}://{user}:***@{tail}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL; None for other backends and in-memory SQLite."""
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def check_url(url: str) -> None:
    """Check that a URL names a backend lightstudy can use, without connecting.

    Raises:
        StorageError: naming the URL (password hidden) and the fix.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if url.startswith("grpc://"):
        _grpc_address(url)
        return
    url = normalize_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise StorageError(
            f"storage {redact(url)!r} is not a database URL",
            fix="use sqlite:///path/study.db or postgresql+psycopg://user@host/db",
        ) from e
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql"):
        raise StorageError(
            f"storage {redact(url)!r}: backend {backend!r} is not supported",
            fix="use sqlite:///path/study.db or postgresql+psycopg://user@host/db",
        )
    driver = parsed.get_driver_name()
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as e:
        fix = (
            "write the URL as postgresql+psycopg://... (psycopg 3 comes with lightstudy)"
            if backend == "postgresql"
            else f"install the {driver} package, or use postgresql+psycopg://... (comes with lightstudy)"
        )
        raise StorageError(f"storage {redact(url)!r}: driver {driver!r} is not installed", fix=fix) from e


def normalize_url(url: str) -> str:
    """``url`` with the driver lightstudy ships where it names none: ``postgresql://`` (and
    ``postgres://``) mean psycopg 3, not SQLAlchemy's default psycopg2, which is not installed."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def _grpc_address(url: str) -> tuple[str, int]:
    host, _, port = url[len("grpc://") :].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise StorageError(
            f"storage {url!r} is not a gRPC proxy address",
            fix="write it as grpc://host:port (the address of lightstudy proxy)",
        )
    return host, int(port)


def open_storage(url: str, *, create: bool = True) -> Any:
    """Connect to the study database (tables are created when ``create``), or to a
    ``lightstudy proxy`` for ``grpc://host:port``.

    Raises:
        StorageError: the database cannot be reached or, with ``create=False``, does not exist.
    """
    import optuna
    import sqlalchemy.exc

    url = normalize_url(url)
    check_url(url)
    if url.startswith("grpc://"):
        host, port = _grpc_address(url)
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
        try:
            proxy.wait_server_ready(timeout=PROXY_WAIT_SECONDS)
        except Exception as e:
            raise StorageError(
                f"no lightstudy proxy answers at {host}:{port} ({type(e).__name__})",
                fix="start it with lightstudy proxy --storage DATABASE_URL, or check the address",
            ) from e
        return proxy
    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if path is not None:
        if not path.exists():
            if not create:
                raise StorageError(
                    f"no study database at {path}",
                    fix="run the study first (lightstudy run FILE) or pass --storage URL",
                )
            path.parent.mkdir(parents=True, exist_ok=True)
        _enable_wal(path)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT}
    elif url.startswith("postgresql"):
        engine_kwargs.update(
            pool_pre_ping=True,
            pool_size=POOL_SIZE,
            max_overflow=POOL_OVERFLOW,
            pool_recycle=POOL_RECYCLE,
            connect_args={"connect_timeout": 10},
        )
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create)
    except (
        sqlalchemy.exc.SQLAlchemyError,
        optuna.exceptions.StorageInternalError,
        OSError,
        RuntimeError,
    ) as e:
        reason = db_error_text(e)
        raise StorageError(
            f"cannot open storage {redact(url)}: {redact_text(reason, url)}",
            fix="check that the database server is running and the URL is right",
        ) from e


def redact_text(text: str, url: str) -> str:
    """``text`` with the URL's password, if any, replaced by ``***``."""
    from sqlalchemy.engine import make_url

    with contextlib.suppress(Exception):
        password = make_url(url).password
        if password:
            text = text.replace(str(password), "***")
    return text


def beat(storage: Any, trial_id: int) -> None:
    """Record a running trial's heartbeat: directly in the database, or through lightstudy proxy
    (which turns the ``lightstudy:heartbeat`` system attr into a heartbeat)."""
    backend = getattr(storage, "_backend", storage)
    if hasattr(backend, "record_heartbeat"):
        backend.record_heartbeat(trial_id)
    else:
        from lightstudy.proxy import HEARTBEAT_ATTR

        storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())


def configure_heartbeat(storage: RDBStorage, settings: StudySettings) -> None:
    """Turn on heartbeats and the retry of trials whose worker died, as the spec says.

    The spec lives in the database, so the storage is open before the settings are known; these
    are the public attributes that RDBStorage's own constructor sets from the same arguments.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if not isinstance(storage, RDBStorage):
        return  # behind lightstudy proxy: the proxy keeps heartbeats and reaps stale trials
    storage.heartbeat_interval = settings.heartbeat_interval
    storage.grace_period = settings.grace_period
    storage.heartbeat_stale_trial_callback = RetryHeartbeatStaleTrialCallback(
        max_retry=settings.max_retry, inherit_intermediate_values=True
    )
    storage.failed_trial_callback = storage.heartbeat_stale_trial_callback


@contextlib.contextmanager
def claim_lock(storage: RDBStorage, study_name: str) -> Iterator[None]:
    """Serialize "count the budget, then ask for a trial" across every worker of a study.

    PostgreSQL: a session advisory lock keyed by the study name, so workers on other machines
    wait too. SQLite: an exclusive ``flock`` on a file beside the database (all its workers share
    the machine). Other backends: no lock (the budget may then overshoot by up to one trial per
    concurrent worker).
    """
    if not hasattr(storage, "engine"):  # behind lightstudy proxy, which takes the lock itself
        yield
        return
    url = str(storage.url)
    path = sqlite_path(url)
    if path is not None:
        import fcntl

        with open(f"{path}.lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if url.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(f"lightstudy:{study_name}".encode()) - 2**31
        with storage.engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        return
    yield


def _enable_wal(path: Path) -> None:
    """WAL lets readers and one writer work at once; it is a property of the file, set once."""
    conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as e:
        raise StorageError(
            f"{path} is not a SQLite database ({e})",
            fix="point --storage at the study's study.db, or remove the damaged file",
        ) from e
    finally:
        conn.close()


DB_RETRY_SECONDS = 180.0  # how long storage calls keep retrying while the database is away


def retry_db(fn: Callable[[], T], *, what: str, seconds: float = DB_RETRY_SECONDS) -> T:
    """Call ``fn``, retrying with backoff while the database is unreachable or locked.

    A PostgreSQL restart or a busy SQLite file must not cost a trial: connection errors
    (SQLAlchemy's ``OperationalError``/``InterfaceError``, also when Optuna wraps them in
    ``StorageInternalError``) are retried for up to ``seconds``; other errors propagate at once.
    """
    deadline = time.monotonic() + seconds
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as e:
            cause = connection_error(e)
            if cause is None or time.monotonic() + delay > deadline:
                raise
            _log.warning("%s: database unavailable (%s); retrying in %.1fs", what, db_error_text(cause), delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def db_error_text(error: BaseException) -> str:
    """The first line of what the database driver said (not SQLAlchemy's or Optuna's wrapping)."""
    cause = connection_error(error) or error
    text = str(getattr(cause, "orig", None) or cause).strip()
    return (text.splitlines() or [type(cause).__name__])[0][:200]


def record_attr(trial: Any, key: str, value: Any) -> None:
    """``trial.set_user_attr``, riding out a database restart."""
    retry_db(lambda: trial.set_user_attr(key, value), what="record the trial")


def connection_error(error: BaseException) -> BaseException | None:
    """The connection-level error in ``error``'s chain, if there is one."""
    import sqlalchemy.exc

    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return current
        code = getattr(current, "code", None)
        if callable(code) and getattr(code(), "name", None) in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return current  # the gRPC proxy (or the database behind it) is away
        current = current.__cause__ or current.__context__
    return None
