"""The server side of ``lightstudy proxy``: Optuna's gRPC storage server in front of the
database, with the heartbeat tunnel and a budget check on every fresh trial.

The rules (what a study's budget is, how often and how to reap) are the caller's
(:mod:`lightstudy.proxy`), passed in as ``admit`` and ``reap``; this module only knows Optuna's
storages.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError
from lightstudy.storage import db_error_text, open_storage, redact
from lightstudy.storage.boundary import BUDGET_SPENT, HEARTBEAT_ATTR, DatabaseStorage, StudyStorage, retry_db, wrap

if TYPE_CHECKING:
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

__all__ = ["BudgetSpentError", "ProxyStorage", "serve"]

_log = logging.getLogger(__name__)

# admit(storage, study_id): may a fresh trial of the study start now? (asked under its claim lock)
Admit = Callable[[StudyStorage, int], bool]
# reap(database): fail and retry the stale trials of every study; returns how many
Reap = Callable[[DatabaseStorage], int]


class BudgetSpentError(RuntimeError):
    """A fresh trial was asked for past the study-wide budget."""


class ProxyStorage:
    """The storage the gRPC server serves: Optuna's cached RDB storage, plus the budget check
    (``admit``) and the heartbeat tunnel (:data:`HEARTBEAT_ATTR`)."""

    def __init__(self, rdb: RDBStorage, admit: Admit) -> None:
        from optuna.storages import _CachedStorage

        self._rdb = rdb
        self._cached = _CachedStorage(rdb)
        self._boundary = wrap(self._cached)
        self._admit = admit
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cached, name)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is not None:  # queued or retried trials: already inside the budget
            return self._cached.create_new_trial(study_id, template_trial)
        name = self._cached.get_study_name_from_id(study_id)

        def admitted() -> int:  # retried whole, lock included (retry_db: nothing inside a claim lock is)
            with self._lock, self._boundary.claim_lock(name):
                if not self._admit(self._boundary, study_id):
                    raise BudgetSpentError(BUDGET_SPENT)
                return self._cached.create_new_trial(study_id)

        return retry_db(admitted, what="admit a trial")

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == HEARTBEAT_ATTR:
            self._rdb.record_heartbeat(trial_id)
            return
        self._cached.set_trial_system_attr(trial_id, key, value)


def serve(
    url: str,
    *,
    admit: Admit,
    reap: Reap,
    host: str,
    port: int,
    threads: int,
    reap_interval: float,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve the database at ``url`` over gRPC until interrupted (or ``stop`` is set), reaping
    every ``reap_interval`` seconds.

    Raises:
        LightstudyError: the storage is not a database, or the port is taken.
    """
    from optuna.storages._grpc.server import make_server

    if url.startswith("grpc://"):
        raise LightstudyError(
            "the proxy serves a database, not another proxy",
            fix="pass --storage postgresql+psycopg://... (the database URL)",
        )
    rdb = open_storage(url)
    if host not in ("127.0.0.1", "localhost", "::1"):
        _log.warning(
            "the gRPC proxy has no authentication or TLS and listens on %s: keep it on a private "
            "network, or reach it through an SSH tunnel",
            host,
        )
    pool = ThreadPoolExecutor(max_workers=threads)
    server = None
    reaper: DatabaseStorage | None = None
    try:
        try:  # a taken port fails in make_server (binding), a few others in start
            server = make_server(ProxyStorage(rdb, admit), host, port, thread_pool=pool)  # type: ignore[arg-type]
            server.start()
        except RuntimeError as e:
            raise LightstudyError(f"cannot listen on {host}:{port} ({e})", fix="choose another --port") from e
        address = f"{host}:{port}"
        _log.info("gRPC storage proxy for %s on %s; workers use --storage grpc://%s", redact(url), address, address)
        opened = wrap(open_storage(url))  # heartbeat settings are per study: the reaper owns this one
        assert isinstance(opened, DatabaseStorage)
        reaper = opened
        stop = stop or threading.Event()
        if ready is not None:
            ready.set()
        while not stop.wait(reap_interval):
            try:
                count = reap(reaper)
            except Exception as e:  # the database may be restarting; the next round tries again
                _log.warning("reaping stale trials failed: %s", db_error_text(e))
                continue
            if count:
                _log.info("failed and retried %d stale trial(s)", count)
    except KeyboardInterrupt:
        pass
    finally:
        # In-flight requests finish before the pools close: a proxy run inside a process (tests,
        # notebooks) must leave no database connection or thread behind when it returns.
        if server is not None:
            server.stop(grace=5).wait()
        pool.shutdown(wait=True)
        rdb.engine.dispose()
        if reaper is not None:
            reaper.rdb.engine.dispose()
