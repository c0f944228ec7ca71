"""The study storage: the only code that knows Optuna's storage internals and schema.

This module: which URL (flag > environment > spec > default), checked without connecting and
shown with the password hidden; :func:`open_storage`, which also refuses an Optuna schema the
queries here were not written for; :func:`retry_db` (riding out database restarts), from the boundary.
:mod:`lightstudy.storage.boundary`: :class:`~lightstudy.storage.boundary.StudyStorage` over the
database directly or through ``lightstudy proxy`` (heartbeat, claim lock, budget counts, a
trial's attrs in one transaction, reaping, the checkpoint list, the pruner's reads).
:mod:`lightstudy.storage.server`: the proxy's gRPC server.

SQLite (the embedded default) gets WAL and a busy timeout so several local workers share one
file; PostgreSQL gets a ping of connections idle for a second or more (not of every checkout)
and small bounded pools so many workers on many machines do not exhaust the server. Importing
this module imports no Optuna (the CLI's ``--help`` stays instant).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from lightstudy.errors import StorageError
from lightstudy.storage.boundary import DB_RETRY_SECONDS, connection_error, db_error_text, retry_db

__all__ = [
    "DB_RETRY_SECONDS",
    "ENV_VAR",
    "SCHEMA_VERSIONS",
    "check_schema",
    "check_url",
    "connection_error",
    "db_error_text",
    "default_url",
    "grpc_address",
    "normalize_url",
    "open_storage",
    "preload",
    "record_attr",
    "redact",
    "redact_text",
    "resolve_url",
    "retry_db",
    "sqlite_path",
]

ENV_VAR = "LIGHTSTUDY_STORAGE"
# Optuna's RDB schema (alembic revision) that the raw queries of this package were written and
# tested against (Optuna 4.2 to 5.1 all use it); another one is refused rather than misread.
SCHEMA_VERSIONS = frozenset({"v3.2.0.a"})
SQLITE_BUSY_TIMEOUT = 60.0  # seconds a SQLite writer waits for the lock before failing
PROXY_WAIT_SECONDS = 30.0  # seconds a client waits for `lightstudy proxy` to answer before failing
POOL_SIZE = 2  # connections a process keeps open to PostgreSQL (workers need 1-2)
POOL_OVERFLOW = 4  # extra connections a burst may open, closed when returned
POOL_RECYCLE = 1800  # seconds before a pooled connection is replaced
PING_IDLE_SECONDS = 1.0  # a pooled PostgreSQL connection idle this long is pinged before use

# What the database says when the fault is the URL's or the account's, not an outage: a
# worker does not wait for these (psycopg reports them as connection errors too).
NOT_AN_OUTAGE = ("does not exist", "authentication failed", "no password supplied", "no pg_hba.conf entry")

_log = logging.getLogger(__name__)


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


def redact_text(text: str, url: str) -> str:
    """``text`` with the URL's password, if any, replaced by ``***``."""
    from sqlalchemy.engine import make_url

    with contextlib.suppress(Exception):
        password = make_url(url).password
        if password:
            text = text.replace(str(password), "***")
    return text


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
        grpc_address(url)
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


def grpc_address(url: str) -> tuple[str, int]:
    host, _, port = url[len("grpc://") :].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise StorageError(
            f"storage {url!r} is not a gRPC proxy address",
            fix="write it as grpc://host:port (the address of lightstudy proxy)",
        )
    return host, int(port)


def record_attr(trial: Any, key: str, value: Any, *, system: bool = False) -> None:
    """``trial.set_user_attr`` (or, with ``system``, the trial's system attr), riding out a
    database restart: a trial process's own ``optuna.Trial``, or the pipe to its worker (a
    ``WorkerTrial``), which records it."""
    if not system:
        retry_db(lambda: trial.set_user_attr(key, value), what="record the trial")
    elif hasattr(trial, "set_system_attr"):  # the pipe: the worker records it
        trial.set_system_attr(key, value)
    else:
        from lightstudy.storage.boundary import storage_of

        storage_of(trial.study).record(trial, key, value, system=True)


_preloaded: list[bool] = []  # preload has run in this process


def preload(url: str | None = None) -> None:
    """Pay now what this process's first :func:`open_storage` would: importing Optuna's storage,
    SQLAlchemy and Alembic, declaring Optuna's ORM models and reading Alembic's migration scripts
    (Optuna's schema check): about 0.5 s on 2 cores. Done on an in-memory SQLite database, so
    nothing anywhere is read or written; for a ``postgresql`` URL the driver is imported too.

    ``lightstudy run`` calls it while its warm process imports torch (the study is created only
    once the warm process has checked the spec): 1-trial runs 0.5 s sooner, and the workers it
    forks (:class:`lightstudy.launcher.ForkedWorker`) have it done. A spawned worker does not: on
    2 cores, 0.5 s of CPU in each beside the warm process's import delayed it more than it saved
    (measured: 1 worker 8.3 s against 7.6 s without, 4 workers 14.1 s against 12.3 s).
    """
    import optuna

    if not _preloaded:
        optuna.storages.RDBStorage("sqlite:///:memory:").engine.dispose()
        _preloaded.append(True)  # once a process: a second call costs nothing
    if url is not None and normalize_url(url).startswith("postgresql"):
        import psycopg  # noqa: F401
        import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401


def open_storage(url: str, *, create: bool = True, wait: bool = False) -> Any:
    """Connect to the study database (tables are created when ``create``), or to a
    ``lightstudy proxy`` for ``grpc://host:port``; returns the Optuna storage (:func:`wrap`
    gives its boundary).

    With ``wait`` (a worker, which a scheduler may start while the database restarts), a
    database that does not answer is waited for up to ``DB_RETRY_SECONDS``; what the user must
    fix (a bad URL, a missing database, refused credentials, another schema) fails at once.

    Raises:
        StorageError: the database cannot be reached, has a schema lightstudy does not know, or,
            with ``create=False``, does not exist.
    """
    import optuna
    import sqlalchemy.exc

    url = normalize_url(url)
    check_url(url)
    if url.startswith("grpc://"):
        host, port = grpc_address(url)
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
            pool_pre_ping=False,  # _ping_idle: only a connection idle for a while is pinged
            pool_size=POOL_SIZE,
            max_overflow=POOL_OVERFLOW,
            pool_recycle=POOL_RECYCLE,
            connect_args={"connect_timeout": 10},
        )
    started = time.monotonic()
    deadline = started + (DB_RETRY_SECONDS if wait else 0.0)
    delay = 0.2
    while True:
        rdb = None
        try:
            rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create)
            version = rdb.get_current_version()
            break
        except (
            sqlalchemy.exc.SQLAlchemyError,
            optuna.exceptions.StorageInternalError,
            OSError,
            RuntimeError,
        ) as e:
            if rdb is not None:
                rdb.engine.dispose()
            if isinstance(e, RuntimeError) and (stored := _stored_version(url)) is not None:
                check_schema(url, stored)  # Optuna refused a schema of another release: say which
            reason = redact_text(db_error_text(e), url)
            if _is_outage(e) and time.monotonic() + delay <= deadline:
                _log.warning("database unavailable (%s); retrying in %.1fs", reason, delay)
                time.sleep(delay)  # backoff while the server is away, not a synchronisation
                delay = min(delay * 2, 5.0)
                continue
            waited = time.monotonic() - started
            raise StorageError(
                f"cannot open storage {redact(url)}: {reason}" + (f" (waited {waited:.0f} s)" if wait else ""),
                fix="check that the database server is running and the URL is right",
            ) from e
    check_schema(url, version)
    if url.startswith("postgresql"):
        _ping_idle(rdb.engine)
    return rdb


def _ping_idle(engine: Any) -> None:
    """Pessimistic disconnect handling for connections that sat in the pool: one idle for
    ``PING_IDLE_SECONDS`` or more is pinged on checkout and replaced if the server is gone
    (SQLAlchemy's ``pool_pre_ping`` pings every checkout: a round trip per query, a third of a
    trial's). A connection used within that time that the server dropped meanwhile fails on use;
    SQLAlchemy then invalidates the pool and :func:`retry_db` repeats the call on a new one."""
    import sqlalchemy.exc
    from sqlalchemy import event

    @event.listens_for(engine, "checkin")
    def _used(dbapi_conn: Any, record: Any) -> None:
        record.info["lightstudy_used"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        used = record.info.get("lightstudy_used")
        if used is None or time.monotonic() - used < PING_IDLE_SECONDS:
            return  # just opened, or used a moment ago
        try:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            dbapi_conn.rollback()
        except Exception as e:
            raise sqlalchemy.exc.DisconnectionError(str(e)) from e  # the pool opens a new one


def _is_outage(error: BaseException) -> bool:
    """Whether ``error`` is the database being away (worth waiting for), not a wrong URL or account."""
    cause = connection_error(error)
    if cause is None:
        return False
    text = str(getattr(cause, "orig", None) or cause).lower()
    return not any(sign in text for sign in NOT_AN_OUTAGE)


def _stored_version(url: str) -> str | None:
    """The Optuna schema revision (alembic's) of the database at ``url``; None if unreadable."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.connect() as conn:
                return str(conn.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar_one())
        finally:
            engine.dispose()
    except Exception:
        return None


def check_schema(url: str, version: str) -> None:
    """Refuse a database whose Optuna schema is not one lightstudy's queries were written for.

    Raises:
        StorageError: naming the version found, the ones known, and the fix.
    """
    if version not in SCHEMA_VERSIONS:
        known = ", ".join(sorted(SCHEMA_VERSIONS))
        raise StorageError(
            f"storage {redact(url)}: Optuna schema version {version!r} is not one lightstudy knows ({known})",
            fix="use an Optuna release with that schema (optuna storage upgrade moves a database forward)",
        )


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
