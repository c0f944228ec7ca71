"""Optuna's own storage contract, run against the storages as lightstudy opens them.

``optuna.testing.pytest_storages.StorageTestCase`` is the suite Optuna ships for third-party
storages. It runs here, unchanged, against each storage a lightstudy worker or command talks to:

- ``sqlite``: ``open_storage`` on a SQLite file (WAL, busy timeout), heartbeats and the retry of
  stale trials configured from a spec as ``load_study`` does;
- ``postgres``: the same on PostgreSQL (pre-ping, bounded pool, recycling);
- ``lightstudy_proxy``: that PostgreSQL behind ``lightstudy proxy`` (``serve``: the cached storage
  plus the budget check and the heartbeat tunnel), reached as workers reach it (``grpc://``);
- ``optuna_proxy`` (``TestOptunaOwnProxy``, only the tests marked as upstream failures): the same
  database behind Optuna's own gRPC proxy (``make_server`` over ``get_storage``, as
  ``run_grpc_proxy_server`` serves it), to show each fails there too, and to notice (strict xfail)
  when Optuna fixes it. Run once on the whole suite (Optuna 5.1), it failed only that test.

Each kind's storage (and proxy) is opened once for the module and emptied before each test (the
suite assumes an empty storage, not a new object): a proxy and a database per test cost most of
this file's time.

Retries through a database restart (``retry_db``) wrap the worker's calls, not the storage object,
so they are not part of this contract; tests/test_worker.py and tests/test_storage.py hold them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.storages._rdb import models
from optuna.testing.pytest_storages import StorageTestCase
from optuna.trial import TrialState

from conftest import free_port, tiny_spec
from lightstudy.proxy import serve
from lightstudy.spec import spec_from_dict
from lightstudy.storage import open_storage
from lightstudy.storage.boundary import wrap

PROXIES = ("lightstudy_proxy", "optuna_proxy")
SETTINGS = spec_from_dict(tiny_spec()).study  # heartbeat and retry settings, as a study's spec gives them

PARAMS_ORDER = (
    "Optuna's gRPC proxy sends a trial's params (and distributions) as protobuf maps, which keep no "
    "order: the client sees them in the order of upb's hash table, seeded per process, not in the "
    "order they were set (optuna/storages/_grpc/servicer.py _to_proto_trial / _from_proto_trial)"
)


def _grpc_reorders(names: list[str]) -> bool:
    """Whether, in this process, a trial's params set in the order ``names`` come out of Optuna's
    gRPC round trip (server message, reply, wire, client) in another order.

    upb seeds its hash per process, so the order the proxy returns is fixed within a process but
    differs between processes; this probe takes the path the proxy takes, so the contract test
    can be a strict xfail exactly when the upstream cause applies, and must pass otherwise.
    """
    from optuna.distributions import FloatDistribution
    from optuna.storages._grpc.auto_generated import api_pb2
    from optuna.storages._grpc.servicer import _from_proto_trial, _to_proto_trial

    trial = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        params={name: 1.0 for name in names},
        distributions={name: FloatDistribution(0.0, 2.0) for name in names},
    )
    trial._trial_id = 1
    reply = api_pb2.GetTrialsReply(trials=[_to_proto_trial(trial)])
    [back] = api_pb2.GetTrialsReply.FromString(reply.SerializeToString()).trials
    return list(_from_proto_trial(back).params) != names


def _upstream_failure(request: pytest.FixtureRequest, kind: str) -> str | None:
    """The upstream reason this test fails on this storage, if it does (see the module docstring)."""
    if (
        kind in PROXIES
        and request.node.originalname == "test_get_all_trials_params_order"
        and _grpc_reorders(request.getfixturevalue("param_names"))
    ):
        return PARAMS_ORDER
    return None


def open_contract_storage(url: str) -> Any:
    """The one place the contract opens a storage: ``open_storage`` as workers and commands call
    it, with heartbeats set up as ``load_study`` sets them from a study's spec (a no-op for
    ``grpc://``, where the proxy keeps heartbeats)."""
    storage = open_storage(url)
    wrap(storage).configure(SETTINGS.heartbeat_interval, SETTINGS.grace_period, SETTINGS.max_retry)
    return storage


class _ProxyThread:
    """A gRPC storage proxy over the database ``url``, in a thread of this process, on a free port:
    ``lightstudy proxy`` (``serve``) or Optuna's own (``make_server`` over ``get_storage``, what
    ``run_grpc_proxy_server`` runs)."""

    def __init__(self, kind: str, url: str) -> None:
        self.port = free_port()
        self.stop = threading.Event()
        ready = threading.Event()
        if kind == "lightstudy_proxy":
            target: Any = serve
            args: tuple[Any, ...] = (url,)
            kwargs: dict[str, Any] = {"port": self.port, "ready": ready, "stop": self.stop}
        else:
            target, args, kwargs = self._serve_optuna, (url, ready), {}
        self._thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
        self._thread.start()
        assert ready.wait(60), f"{kind} did not start"

    def _serve_optuna(self, url: str, ready: threading.Event) -> None:
        from optuna.storages import get_storage
        from optuna.storages._grpc.server import make_server

        backend: Any = get_storage(url)
        server = make_server(backend, "127.0.0.1", self.port)
        server.start()
        ready.set()
        self.stop.wait()
        server.stop(5).wait()
        backend._backend.engine.dispose()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the proxy did not stop"


# Optuna's tables that hold a study's data (the schema's version rows stay).
DATA_TABLES = [t.name for t in reversed(models.BaseModel.metadata.sorted_tables) if t.name != "version_info"]


class _Backend:
    """One storage of a kind, opened once for the module (a database, and the proxy in front of
    it) and emptied before each test: the suite assumes an empty storage, not a new object.

    Emptying keeps the id sequences (PostgreSQL), so the caches of the proxies (keyed by study
    id) never see an id again; SQLite's storage has no cache."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.proxy: _ProxyThread | None = None
        if kind in PROXIES:
            self.proxy = _ProxyThread(kind, url)
            self.storage = open_contract_storage(f"grpc://127.0.0.1:{self.proxy.port}")
        else:
            self.storage = open_contract_storage(url)
        self._admin = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)

    def empty(self) -> None:
        with self._admin.begin() as conn:
            if self.url.startswith("sqlite"):
                for table in DATA_TABLES:
                    conn.execute(sqlalchemy.text(f"DELETE FROM {table}"))
            else:  # a lock held by a stuck proxy request fails here, not as a hang
                conn.execute(sqlalchemy.text("SET LOCAL lock_timeout = '20s'"))
                conn.execute(sqlalchemy.text(f"TRUNCATE {', '.join(DATA_TABLES)} CASCADE"))

    def close(self) -> None:
        try:
            if self.proxy is not None:
                self.storage.close()
                self.proxy.close()
            else:
                self.storage.engine.dispose()
        finally:
            self._admin.dispose()


@pytest.fixture(scope="module")
def backends(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``backends(kind)``: the module's storage of that kind, opened on first use."""
    opened: dict[str, _Backend] = {}
    databases: list[str] = []

    def get(kind: str) -> _Backend:
        if kind not in opened:
            if kind == "sqlite":
                url = f"sqlite:///{tmp_path_factory.mktemp('contract') / 'study.db'}"
            else:
                url = request.getfixturevalue("pg_clones").take()
                databases.append(url)
            opened[kind] = _Backend(kind, url)
        return opened[kind]

    try:
        yield get
    finally:
        for backend in opened.values():
            backend.close()
        for url in databases:
            request.getfixturevalue("pg_clones").drop(url)


def _open(kind: str, request: pytest.FixtureRequest) -> Any:
    reason = _upstream_failure(request, kind)
    if reason is not None:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    backend = request.getfixturevalue("backends")(kind)
    backend.empty()
    return backend.storage


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("lightstudy_proxy", marks=pytest.mark.postgres),
    ]
)
def storage(request: pytest.FixtureRequest, backends: Any) -> Any:  # backends named: one xdist process runs them
    return _open(request.param, request)


@pytest.mark.postgres
def test_an_emptied_storage_holds_no_study_and_serves_fresh_ids(backends: Any) -> None:
    """What reusing one storage per kind rests on: after ``empty`` no study is left, and a new
    study gets an id no earlier study had (a proxy's cache cannot answer for it)."""
    for kind in ("sqlite", "postgres", "lightstudy_proxy"):
        backend = backends(kind)
        backend.empty()
        first = backend.storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
        backend.storage.set_study_user_attr(first, "k", "old")
        backend.empty()
        assert backend.storage.get_all_studies() == [], kind
        second = backend.storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
        assert backend.storage.get_study_user_attrs(second) == {}, kind
        if kind != "sqlite":
            assert second != first, kind


class TestOptunaStorageContract(StorageTestCase):
    """Every test of Optuna's storage suite, on each of lightstudy's storages."""


@pytest.mark.postgres
class TestOptunaOwnProxy:
    """The tests lightstudy's proxy fails, on Optuna's own proxy over the same database: they fail
    there too (so the failure is upstream's), and a fix upstream shows as a strict xpass."""

    @pytest.fixture
    def storage(self, request: pytest.FixtureRequest, backends: Any) -> Any:
        return _open("optuna_proxy", request)

    test_get_all_trials_params_order = StorageTestCase.test_get_all_trials_params_order
