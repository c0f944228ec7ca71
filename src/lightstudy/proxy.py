"""``lightstudy proxy``: Optuna's gRPC storage proxy in front of the database, for large fleets.

Hundreds of workers, each with a trial process, would each hold database connections; behind the
proxy they hold none (they use ``grpc://host:port`` storage), and the database sees the proxy's
small pool only.

Optuna's proxy lacks three things lightstudy relies on; this module makes up for them:

- **Heartbeats.** ``GrpcStorageProxy`` is no heartbeat storage. A worker behind the proxy sends
  its trial's heartbeat as the trial system attr ``lightstudy:heartbeat``, which the proxy turns
  into ``RDBStorage.record_heartbeat`` (the attr itself is never written), and the proxy reaps
  stale trials itself (fail, then retry, as ``RetryHeartbeatStaleTrialCallback`` does) every few
  seconds, with each study's own heartbeat settings.
- **The claim lock.** A worker cannot take the database's advisory lock through the proxy, so
  the proxy counts the study-wide budget itself, under that lock, whenever a worker asks for a
  fresh trial; past the budget it refuses with ``lightstudy: study budget spent``, which workers
  read as "nothing left to claim". Queued and retried trials (``WAITING``) pass as before.
- **Authentication and TLS.** There are none: the proxy binds 127.0.0.1 unless told otherwise,
  and warns when it listens on other interfaces. Expose it only on a private network, or behind
  an SSH tunnel or a TLS-terminating proxy.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError
from lightstudy.storage import claim_lock, configure_heartbeat, db_error_text, open_storage, redact

if TYPE_CHECKING:
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

    from lightstudy.spec import StudySpec

__all__ = ["BUDGET_SPENT", "HEARTBEAT_ATTR", "ProxyStorage", "serve"]

HEARTBEAT_ATTR = "lightstudy:heartbeat"
BUDGET_SPENT = "lightstudy: study budget spent"
REAP_INTERVAL = 5.0  # seconds between the proxy's checks for stale trials
PROXY_THREADS = 32  # requests the proxy serves at once; the database pool queues the rest

_log = logging.getLogger(__name__)


class BudgetSpentError(RuntimeError):
    """A fresh trial was asked for past the study-wide budget."""


class ProxyStorage:
    """The storage the gRPC server serves: Optuna's cached RDB storage, plus the budget check and
    the heartbeat tunnel described in the module docstring."""

    def __init__(self, rdb: RDBStorage) -> None:
        from optuna.storages import _CachedStorage

        self._rdb = rdb
        self._cached = _CachedStorage(rdb)
        self._lock = threading.Lock()
        self._specs: dict[int, StudySpec | None] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cached, name)

    def _spec(self, study_id: int) -> StudySpec | None:
        from lightstudy.spec import spec_from_dict
        from lightstudy.study import SPEC_ATTR

        doc = self._cached.get_study_user_attrs(study_id).get(SPEC_ATTR)
        if doc is None:
            return None  # not a lightstudy study: no budget to keep
        return spec_from_dict(doc, source=f"study id {study_id}")

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is not None:  # queued or retried trials: already inside the budget
            return self._cached.create_new_trial(study_id, template_trial)
        spec = self._spec(study_id)
        if spec is None:
            return self._cached.create_new_trial(study_id)
        from lightstudy.study import budget

        with self._lock, claim_lock(self._rdb, spec.study.name):
            state = budget(self._cached.get_all_trials(study_id, deepcopy=False), spec)
            if state.full or state.timed_out:
                raise BudgetSpentError(BUDGET_SPENT)
            return self._cached.create_new_trial(study_id)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == HEARTBEAT_ATTR:
            self._rdb.record_heartbeat(trial_id)
            return
        self._cached.set_trial_system_attr(trial_id, key, value)


def reap_once(rdb: RDBStorage) -> int:
    """Fail and retry the stale trials of every lightstudy study; returns how many."""
    import warnings

    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    from lightstudy.spec import spec_from_dict
    from lightstudy.study import SPEC_ATTR, reap_unbeaten

    reaped = 0
    for summary in rdb.get_all_studies():
        doc = summary.user_attrs.get(SPEC_ATTR)
        if doc is None:
            continue
        spec = spec_from_dict(doc, source=f"study {summary.study_name!r}")
        configure_heartbeat(rdb, spec.study)
        study = optuna.load_study(study_name=summary.study_name, storage=rdb)
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fail_stale_trials(study)
            reap_unbeaten(study, spec)
        reaped += len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
    return reaped


def serve(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 13000,
    threads: int = PROXY_THREADS,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run the proxy until interrupted (or ``stop`` is set).

    Raises:
        LightstudyError: the storage is not a database, or the port is taken.
    """
    from optuna.storages import RDBStorage
    from optuna.storages._grpc.server import make_server

    if url.startswith("grpc://"):
        raise LightstudyError(
            "the proxy serves a database, not another proxy",
            fix="pass --storage postgresql+psycopg://... (the database URL)",
        )
    rdb = open_storage(url)
    if not isinstance(rdb, RDBStorage):  # pragma: no cover - open_storage gives RDB for these URLs
        raise LightstudyError(f"cannot serve {redact(url)}", fix="pass a database URL")
    if host not in ("127.0.0.1", "localhost", "::1"):
        _log.warning(
            "the gRPC proxy has no authentication or TLS and listens on %s: keep it on a private "
            "network, or reach it through an SSH tunnel",
            host,
        )
    server = make_server(ProxyStorage(rdb), host, port, thread_pool=ThreadPoolExecutor(max_workers=threads))  # type: ignore[arg-type]
    try:
        server.start()
    except RuntimeError as e:
        raise LightstudyError(f"cannot listen on {host}:{port} ({e})", fix="choose another --port") from e
    _log.info(
        "gRPC storage proxy for %s on %s:%d; workers use --storage grpc://%s:%d", redact(url), host, port, host, port
    )
    reaper_rdb = open_storage(url)  # heartbeat settings are per study: the reaper owns this one
    stop = stop or threading.Event()
    if ready is not None:
        ready.set()
    try:
        while not stop.wait(REAP_INTERVAL):
            try:
                count = reap_once(reaper_rdb)
            except Exception as e:  # the database may be restarting; the next round tries again
                _log.warning("reaping stale trials failed: %s", db_error_text(e))
                continue
            if count:
                _log.info("failed and retried %d stale trial(s)", count)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=5)
