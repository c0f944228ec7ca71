"""The one place that knows how Optuna stores a study: behind :class:`StudyStorage`.

Two implementations: :class:`DatabaseStorage` talks to the database (SQLite or PostgreSQL)
through Optuna's ``RDBStorage``, with what Optuna's public API lacks written against its schema
(one-transaction attrs, aggregate budget counts, the claim lock, unbeaten trials, incremental
pruner reads); :class:`ProxyClientStorage` talks to ``lightstudy proxy`` (gRPC), whose server
(:mod:`lightstudy.storage.server`) does those things on the database's side. Any other Optuna
storage (in memory, journal) gets :class:`StudyStorage`'s plain versions over the public API.

Every method rides out a database restart itself (:func:`retry_db`). This module imports no
other lightstudy module (it is the floor the rest stands on) and no Optuna at import time.
Nothing outside this package reads ``study._storage``, ``study._study_id``, ``trial._trial_id``
or imports ``optuna.storages._*``: :func:`storage_of`, :func:`study_id` and :func:`trial_id`
answer that.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import datetime
import json
import logging
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage, RDBStorage
    from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "ATTEMPT_ATTRS",
    "BUDGET_SPENT",
    "DB_RETRY_SECONDS",
    "HEARTBEAT_ATTR",
    "Counts",
    "DatabaseStorage",
    "ProxyClientStorage",
    "RetryCallback",
    "StudyStorage",
    "beat",
    "claim_lock",
    "connection_error",
    "db_error_text",
    "retry_db",
    "storage_of",
    "study_id",
    "trial_id",
    "wrap",
]

_CHUNK = 500  # ids per IN (...) query (SQLite's variable limit is far above)

HEARTBEAT_ATTR = "lightstudy:heartbeat"  # trial system attr the proxy turns into a heartbeat
BUDGET_SPENT = "lightstudy: study budget spent"  # the proxy's refusal of a fresh trial

# User attrs that describe one attempt of a trial, not its parameters: a retry does not inherit
# them, whether the worker requeues it (StudyStorage.requeue) or the reaper does (RetryCallback).
# "checkpoint" is lightstudy.checkpoints.CHECKPOINT_ATTR.
ATTEMPT_ATTRS = frozenset(
    {
        "threads",
        "warnings",
        "fail_reason",
        "interrupted",
        "timings",
        "checkpoint",
        "worker",
        "gpu",
        "resumed_from",
        "config",
        "config_summary",
        "versions",
        "gpu_memory",  # lightstudy.packing.MEMORY_ATTR
        "retried_alone",  # lightstudy.packing.RETRIED_ALONE_ATTR
    }
)

_log = logging.getLogger(__name__)
T = TypeVar("T")
_OPEN = threading.local()  # conns: engine id -> this thread's open transaction (DatabaseStorage._transaction)
# True while this thread holds a claim lock that a database restart would drop with its connection
# (PostgreSQL's advisory lock): retry_db then retries nothing, and the claim is redone whole.
_LOCK_ON_CONNECTION: contextvars.ContextVar[bool] = contextvars.ContextVar("lightstudy_claim_lock", default=False)


# --- riding out database restarts ------------------------------------------------------------

DB_RETRY_SECONDS = 180.0  # how long storage calls keep retrying while the database is away


def retry_db(fn: Callable[[], T], *, what: str, seconds: float = DB_RETRY_SECONDS) -> T:
    """Call ``fn``, retrying with backoff while the database is unreachable or locked.

    A PostgreSQL restart or a busy SQLite file must not cost a trial: connection errors
    (SQLAlchemy's ``OperationalError``/``InterfaceError``, also when Optuna wraps them in
    ``StorageInternalError``) are retried for up to ``seconds``; other errors propagate at once.

    Inside a PostgreSQL claim lock nothing is retried: the restart that broke the step also
    dropped the lock (it lives on its connection), so another worker may be claiming beside this
    one, and a step retried after the restart would act on what was counted before it (two trials
    sampled from one seed, the budget overshot). The error reaches the claim's own ``retry_db``,
    which takes the lock again and counts again.
    """
    deadline = time.monotonic() + seconds
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as e:
            cause = connection_error(e)
            if cause is None or _LOCK_ON_CONNECTION.get() or time.monotonic() + delay > deadline:
                raise
            _log.warning("%s: database unavailable (%s); retrying in %.1fs", what, db_error_text(cause), delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def db_error_text(error: BaseException) -> str:
    """The first line of what the database driver said (not SQLAlchemy's or Optuna's wrapping)."""
    cause = connection_error(error) or error
    text = str(getattr(cause, "orig", None) or cause).strip()
    return (text.splitlines() or [type(cause).__name__])[0][:200]


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


def _upsert(conn: Any, table: Any, match: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Insert a row of ``table`` (its unique columns ``match``), or update its ``values`` where
    the row is there: one statement on PostgreSQL and SQLite, an update then an insert elsewhere."""
    import sqlalchemy

    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
        conn.execute(
            insert.values(**match, **values).on_conflict_do_update(
                index_elements=[table.c[name] for name in match], set_=dict(values)
            )
        )
        return
    mine = sqlalchemy.and_(*(table.c[name] == value for name, value in match.items()))
    if not conn.execute(sqlalchemy.update(table).where(mine).values(**values)).rowcount:
        conn.execute(sqlalchemy.insert(table).values(**match, **values))


@dataclass(frozen=True)
class Counts:
    """A study's trials counted for its budget, without reading them one by one."""

    states: Mapping[str, int]  # TrialState name -> trials
    first_start: datetime.datetime | None
    failed_retried: int  # failed trials that a later trial retries (they do not eat the budget)
    grid_started: int  # distinct GridSampler points that have a trial

    @property
    def total(self) -> int:
        return sum(self.states.values())


def study_id(study: optuna.Study) -> int:
    return int(study._study_id)


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return int(trial._trial_id)


def storage_of(study: optuna.Study) -> StudyStorage:
    """The boundary over the storage ``study`` was loaded with."""
    return wrap(study._storage)


def wrap(storage: BaseStorage) -> StudyStorage:
    """The boundary over an Optuna storage (as :func:`open_storage` returns, or a study holds)."""
    from optuna.storages import GrpcStorageProxy, RDBStorage

    backend = getattr(storage, "_backend", storage)  # optuna.load_study caches an RDBStorage
    if isinstance(backend, RDBStorage):
        return DatabaseStorage(storage, backend)
    if isinstance(backend, GrpcStorageProxy):
        return ProxyClientStorage(storage)
    return StudyStorage(storage)


class RetryCallback:
    """Optuna's ``RetryHeartbeatStaleTrialCallback`` (a WAITING copy of a failed trial, its
    intermediate values inherited, at most ``max_retry`` attempts), less the attrs of the failed
    attempt (:data:`ATTEMPT_ATTRS`): a reaped trial's retry must not claim its predecessor's
    config, worker or ``resumed_from``."""

    def __init__(self, max_retry: int | None) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks the callback experimental
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._retry(study, trial)


class StudyStorage:
    """A study storage as lightstudy uses it; this base class serves any Optuna storage through
    its public API (in memory, journal), the subclasses add what their backend can do better."""

    serializes_claims = False  # True: claim_lock makes "count, then ask" atomic across workers
    keeps_heartbeats = False  # True: heartbeats and stale-trial reaping work through this storage
    reads_incrementally = False  # True: trial_states/intermediate_values answer the pruner cache

    def __init__(self, storage: BaseStorage) -> None:
        self.optuna = storage

    # --- trials (Optuna's public calls, each riding out a database restart) -------------------

    def trial(self, trial_id: int) -> FrozenTrial:
        return retry_db(lambda: self.optuna.get_trial(trial_id), what="read the trial")

    def trials(self, study: optuna.Study) -> list[FrozenTrial]:
        return retry_db(lambda: study.get_trials(deepcopy=False), what="read the trials")

    def ask(self, study: optuna.Study) -> optuna.Trial:
        return retry_db(study.ask, what="claim a trial")

    def state(self, trial_id: int) -> TrialState:
        """The trial's state as stored now."""
        return self.trial(trial_id).state

    def tell(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        values: list[float] | None,
        state: TrialState,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """``study.tell`` outside ``Study.optimize``, as lightstudy's workers tell, with the
        attempt's user ``attrs`` recorded first (in a database: in the same transaction).

        A sampler may call ``study.stop()`` from ``after_trial`` (GridSampler does when its grid
        is used up), which raises outside ``optimize``; stopping means nothing here (the budget,
        which counts the grid, ends the study), so that call is a no-op during the tell. A tell
        whose commit reached the database before the connection broke is not told twice.
        """

        if attrs:
            self.set_trial_attrs(trial_id(trial), attrs)
        retry_db(lambda: self._told(study, trial, values, state), what="tell")

    def _told(self, study: optuna.Study, trial: optuna.Trial, values: list[float] | None, state: TrialState) -> None:
        stop = study.stop
        study.stop = lambda: None  # type: ignore[method-assign]
        try:
            study.tell(trial, values, state=state, skip_if_finished=True)
        finally:
            study.stop = stop  # type: ignore[method-assign]

    def report(self, trial: optuna.Trial, value: float, step: int) -> None:
        retry_db(lambda: trial.report(value, step), what="report")

    def should_prune(self, trial: optuna.Trial) -> bool:
        return retry_db(trial.should_prune, what="ask the pruner")

    def report_and_prune(self, trial: optuna.Trial, value: float, step: int) -> bool:
        """An epoch's report, then the pruner's verdict on it (one transaction in a database)."""
        self.report(trial, value, step)
        return self.should_prune(trial)

    def record(self, trial: optuna.Trial, key: str, value: Any, *, system: bool = False) -> None:
        """A user attr of ``trial``, or with ``system`` a system attr (which optuna-dashboard does
        not lay out on the trial's page: records a person does not read there)."""
        if system:
            tid = trial_id(trial)
            retry_db(lambda: self.optuna.set_trial_system_attr(tid, key, value), what="record the trial")
        else:
            retry_db(lambda: trial.set_user_attr(key, value), what="record the trial")

    def set_trial_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """Record user attrs (one call each here; one transaction in a database)."""

        def write() -> None:  # each is an upsert: repeating after a broken connection is safe
            for key, value in attrs.items():
                self.optuna.set_trial_user_attr(trial_id, key, value)

        retry_db(write, what="record the trial")

    def beat(self, trial_id: int) -> None:
        """Record a running trial's heartbeat (nothing where the storage keeps none)."""

    def set_session_options(self, synchronous_commit: str) -> None:
        """Settings of this process's database sessions (``study.storage_options``): nothing here."""

    def requeue(self, study: optuna.Study, frozen: FrozenTrial, max_retry: int | None) -> None:
        """Queue a WAITING copy of the failed trial ``frozen`` (same params and user attrs, the
        intermediate values inherited), as Optuna's RetryHeartbeatStaleTrialCallback does; its
        retry history grows by one; the attempt's attrs (:data:`ATTEMPT_ATTRS`) are dropped. Past
        ``max_retry`` attempts nothing is queued."""
        callback = RetryCallback(max_retry)
        retry_db(lambda: callback(study, frozen), what="retry")

    # --- the budget and claims --------------------------------------------------------------

    @contextlib.contextmanager
    def claim_lock(self, study_name: str) -> Iterator[None]:
        """Serialize "count the budget, then ask for a trial" (no lock here)."""
        yield

    def counts(self, study: optuna.Study, grid_attr: str) -> Counts:
        """The trials' states, first start, retried failures and grid points, from the trials."""
        from optuna.trial import TrialState

        trials = retry_db(lambda: study.get_trials(deepcopy=False), what="count the budget")
        states: dict[str, int] = {}
        for t in trials:
            states[t.state.name] = states.get(t.state.name, 0) + 1
        retried = {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}
        failed_retried = sum(t.state == TrialState.FAIL and t.number in retried for t in trials)
        starts = [t.datetime_start for t in trials if t.datetime_start is not None]
        grid = {json.dumps(t.system_attrs[grid_attr]) for t in trials if grid_attr in t.system_attrs}
        return Counts(states, min(starts, default=None), failed_retried, len(grid))

    def budget_spent(self, error: BaseException) -> bool:
        """Whether ``error`` (from ``study.ask``) is the storage's refusal past the budget."""
        return False

    def configure(self, heartbeat_interval: int, grace_period: int, max_retry: int | None) -> None:
        """Turn on heartbeats and the retry of stale trials (where the storage keeps them)."""

    def reap(self, study: optuna.Study, grace_period: float) -> int:
        """Fail and retry trials whose worker is gone (none here: no heartbeats)."""
        return 0

    def reap_unbeaten(self, study: optuna.Study, grace_period: float, now: datetime.datetime | None = None) -> int:
        """Fail and retry RUNNING trials that never beat, as of ``now`` (none here: no heartbeats)."""
        return 0

    # --- study attrs (the checkpoint list) --------------------------------------------------

    def study_system_attrs(self, study: optuna.Study) -> dict[str, Any]:
        return retry_db(lambda: self.optuna.get_study_system_attrs(study_id(study)), what="read the study")

    def set_study_system_attr(self, study: optuna.Study, key: str, value: Any) -> None:
        retry_db(lambda: self.optuna.set_study_system_attr(study_id(study), key, value), what="record the study")

    def write_note(self, study: optuna.Study, version_key: str, parts: Mapping[str, str], prefix: str) -> None:
        """A note in optuna-dashboard's layout of study system attrs, as its ``save_note`` writes
        one: ``version_key``'s number one up, the body's ``parts``, and every other key under
        ``prefix`` (an older, longer body's parts) blanked. Here as ``save_note`` does it (the
        study's attrs read, one write each); in a database, one transaction that reads one row."""

        def write() -> None:
            attrs = self.optuna.get_study_system_attrs(study_id(study))
            writes: dict[str, Any] = {version_key: int(attrs.get(version_key, 0)) + 1, **parts}
            writes.update({k: "" for k in attrs if k.startswith(prefix) and k not in parts})
            for key, value in writes.items():
                self.optuna.set_study_system_attr(study_id(study), key, value)

        retry_db(write, what="write the note")

    # --- the pruner's incremental reads -----------------------------------------------------

    def complete_intermediate_values(self, study: optuna.Study) -> dict[int, dict[int, float]]:
        """trial id -> intermediate values of every complete trial (storages that keep trials in memory)."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return {trial_id(t): dict(t.intermediate_values) for t in trials}


class DatabaseStorage(StudyStorage):
    """Optuna's RDBStorage, with what lightstudy adds written against its schema."""

    serializes_claims = True
    keeps_heartbeats = True
    reads_incrementally = True

    def __init__(self, storage: BaseStorage, rdb: RDBStorage) -> None:
        super().__init__(storage)
        self.rdb = rdb

    # --- one transaction for what belongs together ------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A connection in a transaction, committed at the end; the reads of this class made in
        this thread meanwhile (:meth:`_reading`: the pruner's) run in it too. Nested: the outer one."""
        conns = _OPEN.__dict__.setdefault("conns", {})
        key = id(self.rdb.engine)
        if key in conns:
            yield conns[key]
            return
        with self.rdb.engine.begin() as conn:
            conns[key] = conn
            try:
                yield conn
            finally:
                del conns[key]

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Any]:
        """This thread's open transaction (:meth:`_transaction`) if there is one, else a connection."""
        conn = _OPEN.__dict__.get("conns", {}).get(id(self.rdb.engine))
        if conn is not None:
            yield conn
            return
        with self.rdb.engine.connect() as conn:
            yield conn

    def state(self, trial_id: int) -> TrialState:
        """One column of one row (a whole trial is six queries)."""
        import sqlalchemy
        from optuna.storages._rdb.models import TrialModel

        trials = TrialModel.__table__

        def read() -> TrialState:
            with self._reading() as conn:
                found = conn.execute(
                    sqlalchemy.select(trials.c.state).where(trials.c.trial_id == trial_id)
                ).scalar_one_or_none()
            if found is None:
                raise KeyError(f"No trial with trial_id {trial_id} exists.")
            return found

        return retry_db(read, what="read the trial")

    def tell(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        values: list[float] | None,
        state: TrialState,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Optuna's tell (its checks, the sampler's ``after_trial``), whose one write, the state
        and values, also records ``attrs``: one transaction, one commit, where a commit is the
        cost (2-8 ms on a busy PostgreSQL). Repeating it after a broken connection is safe: the
        attrs are upserts, and a tell that reached the database is skipped (``skip_if_finished``)."""
        if not attrs:
            return super().tell(study, trial, values, state)
        rdb = self.rdb

        def told() -> None:
            def state_and_attrs(trial_id: int, state: TrialState, values: Any = None) -> bool:
                return self._set_state_with_attrs(trial_id, state, values, attrs)

            rdb.set_trial_state_values = state_and_attrs  # type: ignore[method-assign]
            try:
                self._told(study, trial, values, state)
            finally:
                del rdb.set_trial_state_values  # the class's method again

        retry_db(told, what="tell")

    def _set_state_with_attrs(self, trial_id: int, state: TrialState, values: Any, attrs: Mapping[str, Any]) -> bool:
        """``RDBStorage.set_trial_state_values`` (Optuna 5.1's body) with the user attrs set in its session."""
        import sqlalchemy.exc
        from optuna.storages._rdb.models import TrialModel, TrialUserAttributeModel
        from optuna.storages._rdb.storage import _create_scoped_session
        from optuna.trial import TrialState

        rdb = self.rdb
        try:
            with _create_scoped_session(rdb.scoped_session) as session:
                model = TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                rdb.check_trial_is_updatable(trial_id, model.state)
                for key, value in attrs.items():
                    rdb._set_trial_attr_without_commit(session, TrialUserAttributeModel, trial_id, key, value)
                if values is not None:
                    for objective, v in enumerate(values):
                        rdb._set_trial_value_without_commit(session, model, objective, v)
                if state == TrialState.RUNNING and model.state != TrialState.WAITING:
                    return False
                model.state = state
                if state == TrialState.RUNNING:
                    model.datetime_start = datetime.datetime.now()
                if state.is_finished():
                    model.datetime_complete = datetime.datetime.now()
        except sqlalchemy.exc.IntegrityError:
            return False
        return True

    def report(self, trial: optuna.Trial, value: float, step: int) -> None:
        """``trial.report``: the trial row locked, the value upserted, one commit."""
        retry_db(lambda: self._report_then(trial, value, step, None), what="report")

    def report_and_prune(self, trial: optuna.Trial, value: float, step: int) -> bool:
        """One transaction: the epoch's value is written and the pruner decides on it, its reads
        (lightstudy's cached pruners read through this class) in the same transaction, one commit.
        A pruner that writes (SuccessiveHalving, Hyperband record their rungs through Optuna's own
        sessions) would wait on the trial row this transaction locks: it gets two."""
        if not getattr(trial.study.pruner, "reads_through_boundary", False):
            return super().report_and_prune(trial, value, step)
        verdict = retry_db(lambda: self._report_then(trial, value, step, trial.should_prune), what="report")
        return bool(verdict)

    def _report_then(self, trial: optuna.Trial, value: float, step: int, then: Callable[[], T] | None) -> T | None:
        """Optuna's ``Trial.report`` (its checks, its warning for a step reported twice), then
        ``then()`` (the pruning check, which sees the new value), in one transaction."""
        if len(trial.study.directions) > 1:
            raise NotImplementedError("Trial.report is not supported for multi-objective optimization.")
        value, step = float(value), int(step)
        if step < 0:
            raise ValueError(f"`step={step}` must be non-negative.")
        known = trial._cached_frozen_trial.intermediate_values
        if step in known:
            warnings.warn(f"The reported value is ignored because this `{step=}` is already reported.", stacklevel=3)
            with self._transaction():
                return then() if then is not None else None
        try:
            with self._transaction() as conn:
                self._write_intermediate(conn, trial_id(trial), step, value)
                known[step] = value  # the pruner reads the trial's own values from here
                return then() if then is not None else None
        except BaseException:
            known.pop(step, None)  # not committed: a retry writes it again
            raise

    def _write_intermediate(self, conn: Any, trial_id: int, step: int, value: float) -> None:
        import sqlalchemy
        from optuna.storages._rdb.models import TrialIntermediateValueModel, TrialModel

        trials, table = TrialModel.__table__, TrialIntermediateValueModel.__table__
        state = conn.execute(
            sqlalchemy.select(trials.c.state).where(trials.c.trial_id == trial_id).with_for_update()
        ).scalar_one_or_none()
        if state is None:
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        self.rdb.check_trial_is_updatable(trial_id, state)  # UpdateFinishedTrialError, as Optuna
        stored, kind = TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
        values = {"intermediate_value": stored, "intermediate_value_type": kind}
        _upsert(conn, table, {"trial_id": trial_id, "step": step}, values)

    def set_trial_attrs(self, trial_id: int, attrs: Mapping[str, Any]) -> None:
        """One transaction: each commit costs SQLite 5-15 ms, and a trial has 8 attrs."""
        from optuna.storages._rdb.models import TrialUserAttributeModel
        from optuna.storages._rdb.storage import _create_scoped_session

        def write() -> None:  # an upsert per key: safe to repeat after a broken connection
            with _create_scoped_session(self.rdb.scoped_session, True) as session:
                for key, value in attrs.items():
                    self.rdb._set_trial_attr_without_commit(session, TrialUserAttributeModel, trial_id, key, value)

        retry_db(write, what="record the trial")

    def write_note(self, study: optuna.Study, version_key: str, parts: Mapping[str, str], prefix: str) -> None:
        """One transaction, one commit; the version's row is the only one read (``save_note``
        reads every study system attr twice, and a study holds two for each trial's note)."""
        import sqlalchemy
        from optuna.storages._rdb.models import StudySystemAttributeModel

        table = StudySystemAttributeModel.__table__
        sid = study_id(study)
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"

        def write() -> None:
            with self._transaction() as conn:
                mine = table.c.study_id == sid
                found = conn.execute(
                    sqlalchemy.select(table.c.value_json).where(mine, table.c.key == version_key).with_for_update()
                ).scalar_one_or_none()
                version = (int(json.loads(found)) if found is not None else 0) + 1
                for key, value in {version_key: version, **parts}.items():
                    _upsert(conn, table, {"study_id": sid, "key": key}, {"value_json": json.dumps(value)})
                others = mine & table.c.key.like(pattern, escape="\\") & table.c.key.notin_(list(parts))
                conn.execute(sqlalchemy.update(table).where(others).values(value_json=json.dumps("")))

        retry_db(write, what="write the note")

    def beat(self, trial_id: int) -> None:
        self.rdb.record_heartbeat(trial_id)

    def set_session_options(self, synchronous_commit: str) -> None:
        """PostgreSQL: every session this process opens from now on runs with
        ``synchronous_commit`` (``off``: a commit returns before its WAL record is flushed, so a
        crash of the database server, not of this process, can lose the last few hundred
        milliseconds of commits; see README, Storage). Set at connection start (libpq
        ``options``), so no transaction can undo it; the pool's open connections are replaced.
        SQLite (in WAL mode, as lightstudy opens it): ``off`` is ``PRAGMA synchronous=NORMAL`` on
        each connection, so a commit no longer syncs the WAL file: a crash of this process loses
        nothing, a crash of the machine (power, kernel) can lose the commits since the WAL's last
        checkpoint, and the file stays consistent. Other databases: nothing."""
        import sqlalchemy

        engine = self.rdb.engine
        dialect = engine.dialect.name
        if dialect not in ("postgresql", "sqlite") or getattr(engine, "_lightstudy_commit", "on") == synchronous_commit:
            return
        if not hasattr(engine, "_lightstudy_commit"):  # the listener reads the setting at each connection
            if dialect == "postgresql":

                @sqlalchemy.event.listens_for(engine, "do_connect")
                def _options(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
                    setting = f"-c synchronous_commit={engine._lightstudy_commit}"  # type: ignore[attr-defined]
                    cparams["options"] = f"{cparams['options']} {setting}" if cparams.get("options") else setting

            else:

                @sqlalchemy.event.listens_for(engine, "connect")
                def _pragma(connection: Any, record: Any) -> None:
                    level = "NORMAL" if engine._lightstudy_commit == "off" else "FULL"  # type: ignore[attr-defined]
                    connection.execute(f"PRAGMA synchronous={level}")

        engine._lightstudy_commit = synchronous_commit  # type: ignore[attr-defined]
        engine.dispose()  # connections opened before run with the server's default

    @contextlib.contextmanager
    def claim_lock(self, study_name: str) -> Iterator[None]:
        """PostgreSQL: a session advisory lock keyed by the study name, so workers on other
        machines wait too. SQLite: an exclusive ``flock`` on a file beside the database (all its
        workers share the machine). Others: none (the budget may then overshoot by up to one
        trial per concurrent worker)."""
        url = self.rdb.engine.url
        path = (
            Path(url.database)
            if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
            else None
        )
        if path is not None:
            import fcntl

            with open(f"{path}.lock", "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        if url.get_backend_name() == "postgresql":
            import sqlalchemy

            key = zlib.crc32(f"lightstudy:{study_name}".encode()) - 2**31
            with self.rdb.engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
                token = _LOCK_ON_CONNECTION.set(True)  # see retry_db: a restart ends the claim
                held = False
                try:
                    yield
                finally:
                    _LOCK_ON_CONNECTION.reset(token)
                    with contextlib.suppress(Exception):
                        held = bool(conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key}).scalar())
                        conn.commit()
                    if not held:  # the connection broke during the claim: if its steps all worked, one may have
                        # run beside another worker's claim (a claim a step of which failed is redone whole)
                        _log.warning("study %r: the claim lock was lost during a claim (database restart?)", study_name)
            return
        yield

    def counts(self, study: optuna.Study, grid_attr: str) -> Counts:
        """A few aggregate queries (milliseconds at 10,000 trials) instead of loading every trial."""
        return retry_db(lambda: self._counts(study_id(study), grid_attr), what="count the budget")

    def _counts(self, study_id: int, grid_attr: str) -> Counts:
        import sqlalchemy
        from optuna.storages._rdb.models import TrialModel, TrialSystemAttributeModel
        from optuna.trial import TrialState

        t = TrialModel.__table__
        a = TrialSystemAttributeModel.__table__
        mine = t.c.study_id == study_id
        with self.rdb.engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.select(t.c.state, sqlalchemy.func.count(), sqlalchemy.func.min(t.c.datetime_start))
                .where(mine)
                .group_by(t.c.state)
            ).all()
            histories = conn.execute(
                sqlalchemy.select(a.c.value_json)
                .join(t, a.c.trial_id == t.c.trial_id)
                .where(mine, a.c.key == "retry_history")
            ).scalars()
            retried = sorted({history[-1] for history in map(json.loads, histories) if history})
            grid_started = conn.execute(
                sqlalchemy.select(sqlalchemy.func.count(sqlalchemy.distinct(a.c.value_json)))
                .join(t, a.c.trial_id == t.c.trial_id)
                .where(mine, a.c.key == grid_attr)
            ).scalar_one()
            failed_retried = 0
            for i in range(0, len(retried), _CHUNK):
                failed_retried += conn.execute(
                    sqlalchemy.select(sqlalchemy.func.count()).where(
                        mine, t.c.state == TrialState.FAIL, t.c.number.in_(retried[i : i + _CHUNK])
                    )
                ).scalar_one()
        states = {state.name: n for state, n, _ in rows}
        first_start = min((start for _, _, start in rows if start is not None), default=None)
        return Counts(states, first_start, failed_retried, grid_started)

    def configure(self, heartbeat_interval: int, grace_period: int, max_retry: int | None) -> None:
        """The spec lives in the database, so the storage is open before the settings are known;
        these are the public attributes RDBStorage's own constructor sets from the same arguments."""
        self.rdb.heartbeat_interval = heartbeat_interval
        self.rdb.grace_period = grace_period
        self.rdb.heartbeat_stale_trial_callback = RetryCallback(max_retry)
        self.rdb.failed_trial_callback = self.rdb.heartbeat_stale_trial_callback

    def reap(self, study: optuna.Study, grace_period: float) -> int:
        """Optuna's stale check (trials whose heartbeat stopped), then the RUNNING trials that
        never recorded a heartbeat and started more than ``grace_period`` ago: their claim broke
        (database or worker gone) before the first beat, and Optuna's check, which needs a
        heartbeat, would never free them. Each is failed, then retried."""
        from optuna.storages import fail_stale_trials

        def reaped() -> int:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fail_stale_trials(study)
            return self.reap_unbeaten(study, grace_period)

        return retry_db(reaped, what="reap stale trials")

    def reap_unbeaten(self, study: optuna.Study, grace_period: float, now: datetime.datetime | None = None) -> int:
        import sqlalchemy
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        cutoff = (now or datetime.datetime.now()) - datetime.timedelta(seconds=grace_period)
        query = sqlalchemy.text(
            "SELECT t.trial_id FROM trials t LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
            "WHERE t.study_id = :study AND t.state = 'RUNNING' AND h.trial_id IS NULL "
            "AND t.datetime_start < :cutoff"
        )
        with self.rdb.engine.connect() as conn:
            ids = [row[0] for row in conn.execute(query, {"study": study_id(study), "cutoff": cutoff})]
        callback = self.rdb.get_heartbeat_stale_trial_callback()
        for trial_id in ids:
            try:
                failed = self.rdb.set_trial_state_values(trial_id, state=TrialState.FAIL)
            except UpdateFinishedTrialError:  # another worker got there first
                continue
            if failed:
                _log.warning("trial id %d never recorded a heartbeat; failed and retried", trial_id)
                if callback is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        callback(study, copy.deepcopy(self.rdb.get_trial(trial_id)))
        return len(ids)

    def trial_states(self, study_id: int, *, above: int, among: Iterable[int]) -> list[tuple[int, TrialState]]:
        """(id, state) of the study's trials with an id above ``above`` or in ``among``."""
        import sqlalchemy
        from optuna.storages._rdb.models import TrialModel

        trials = TrialModel.__table__
        query = sqlalchemy.select(trials.c.trial_id, trials.c.state).where(
            trials.c.study_id == study_id,
            sqlalchemy.or_(trials.c.trial_id > above, trials.c.trial_id.in_(sorted(among))),
        )
        with self._reading() as conn:
            return [(int(i), state) for i, state in conn.execute(query)]

    def complete_ids(self, study_id: int) -> set[int]:
        import sqlalchemy
        from optuna.storages._rdb.models import TrialModel
        from optuna.trial import TrialState

        trials = TrialModel.__table__
        query = sqlalchemy.select(trials.c.trial_id).where(
            trials.c.study_id == study_id, trials.c.state == TrialState.COMPLETE
        )
        with self._reading() as conn:
            return {int(row[0]) for row in conn.execute(query)}

    def intermediate_values(self, trial_ids: list[int]) -> dict[int, dict[int, float]]:
        """trial id -> its intermediate values (step -> value), read in chunks."""
        import sqlalchemy
        from optuna.storages._rdb.models import TrialIntermediateValueModel as Model

        table = Model.__table__
        out: dict[int, dict[int, float]] = {i: {} for i in trial_ids}
        with self._reading() as conn:
            for start in range(0, len(trial_ids), _CHUNK):
                chunk = trial_ids[start : start + _CHUNK]
                query = sqlalchemy.select(
                    table.c.trial_id, table.c.step, table.c.intermediate_value, table.c.intermediate_value_type
                ).where(table.c.trial_id.in_(chunk))
                for i, step, value, kind in conn.execute(query):
                    out[i][step] = Model.stored_repr_to_intermediate_value(value, kind)
        return out


class ProxyClientStorage(StudyStorage):
    """A worker behind ``lightstudy proxy``: heartbeats go as the system attr the proxy turns
    into one, the proxy keeps the budget (it refuses a fresh trial past it with
    :data:`BUDGET_SPENT`) and reaps stale trials."""

    def beat(self, trial_id: int) -> None:
        self.optuna.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def budget_spent(self, error: BaseException) -> bool:
        details = getattr(error, "details", None)
        return callable(details) and BUDGET_SPENT in str(details())


def beat(storage: BaseStorage, trial_id: int) -> None:
    """Record a running trial's heartbeat (:meth:`StudyStorage.beat` of ``storage``)."""
    wrap(storage).beat(trial_id)


def claim_lock(storage: BaseStorage, study_name: str) -> contextlib.AbstractContextManager[None]:
    """:meth:`StudyStorage.claim_lock` of ``storage``."""
    return wrap(storage).claim_lock(study_name)
