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

import threading
from typing import TYPE_CHECKING

from lightstudy.storage.boundary import BUDGET_SPENT, HEARTBEAT_ATTR

if TYPE_CHECKING:
    from lightstudy.storage.boundary import DatabaseStorage, StudyStorage

__all__ = ["BUDGET_SPENT", "HEARTBEAT_ATTR", "admit", "reap_once", "serve"]

REAP_INTERVAL = 5.0  # seconds between the proxy's checks for stale trials
PROXY_THREADS = 32  # requests the proxy serves at once; the database pool queues the rest


def admit(storage: StudyStorage, study_id: int) -> bool:
    """May a fresh trial of the study start? Its spec's budget, counted as every worker counts
    it; a study that lightstudy did not create has none."""
    from lightstudy.spec import spec_from_dict
    from lightstudy.study import SPEC_ATTR, budget

    doc = storage.optuna.get_study_user_attrs(study_id).get(SPEC_ATTR)
    if doc is None:
        return True
    spec = spec_from_dict(doc, source=f"study id {study_id}")
    state = budget(storage.optuna.get_all_trials(study_id, deepcopy=False), spec)
    return not (state.full or state.exhausted or state.timed_out)


def reap_once(db: DatabaseStorage) -> int:
    """Fail and retry the stale trials of every lightstudy study, each with its own heartbeat
    settings; returns how many."""
    import optuna
    from optuna.trial import TrialState

    from lightstudy.spec import spec_from_dict
    from lightstudy.study import SPEC_ATTR

    reaped = 0
    for summary in db.optuna.get_all_studies():
        doc = summary.user_attrs.get(SPEC_ATTR)
        if doc is None:
            continue
        settings = spec_from_dict(doc, source=f"study {summary.study_name!r}").study
        db.configure(settings.heartbeat_interval, settings.grace_period, settings.max_retry)
        study = optuna.load_study(study_name=summary.study_name, storage=db.optuna)
        before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        db.reap(study, settings.grace_period)
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
    from lightstudy.storage.server import serve as serve_storage

    serve_storage(
        url,
        admit=admit,
        reap=reap_once,
        host=host,
        port=port,
        threads=threads,
        reap_interval=REAP_INTERVAL,
        ready=ready,
        stop=stop,
    )
