"""lightstudy proxy: Optuna's gRPC storage proxy, plus the budget, heartbeats and reaping."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from conftest import free_port, tiny_spec, wait_until, warm_for_workers
from lightstudy.errors import LightstudyError, StorageError
from lightstudy.proxy import HEARTBEAT_ATTR, admit, serve
from lightstudy.spec import spec_from_dict
from lightstudy.storage import open_storage
from lightstudy.storage.server import BudgetSpentError, ProxyStorage
from lightstudy.study import create_study, load_study
from lightstudy.worker import Worker

TESTS = str(Path(__file__).parent)
# The tests folder (its test models) first, then what this process imports lightstudy from.
PYTHONPATH = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)


def test_the_proxy_keeps_the_study_wide_budget(sqlite_url: str) -> None:
    create_study(spec_from_dict(tiny_spec(n_trials=2)), sqlite_url)
    proxy = ProxyStorage(open_storage(sqlite_url), admit)
    study_id = proxy.get_study_id_from_name("tiny")
    first = proxy.create_new_trial(study_id)
    proxy.create_new_trial(study_id)
    with pytest.raises(BudgetSpentError, match="budget spent"):
        proxy.create_new_trial(study_id)
    # A retry (a WAITING copy) passes: it replaces a trial the budget already counts.
    template = optuna.trial.create_trial(state=TrialState.WAITING)
    proxy.create_new_trial(study_id, template)
    assert proxy.get_trial(first).state == TrialState.RUNNING


def test_heartbeats_tunnel_through_a_system_attr(sqlite_url: str) -> None:
    create_study(spec_from_dict(tiny_spec()), sqlite_url)
    rdb = open_storage(sqlite_url)
    proxy = ProxyStorage(rdb, admit)
    trial_id = proxy.create_new_trial(proxy.get_study_id_from_name("tiny"))
    proxy.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
    assert HEARTBEAT_ATTR not in rdb.get_trial(trial_id).system_attrs
    with rdb.engine.connect() as conn:
        beats = conn.execute(
            sqlalchemy.text("SELECT count(*) FROM trial_heartbeats WHERE trial_id = :t"), {"t": trial_id}
        ).scalar()
    assert beats == 1


def test_bad_proxy_addresses_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightstudy.storage.PROXY_WAIT_SECONDS", 2.0)  # not the 30 s a real client waits
    with pytest.raises(StorageError, match="grpc://host:port"):
        open_storage("grpc://nohost")
    with pytest.raises(StorageError, match="no lightstudy proxy answers"):
        open_storage(f"grpc://127.0.0.1:{free_port()}")
    with pytest.raises(LightstudyError, match="not another proxy"):
        serve("grpc://127.0.0.1:1")


def test_a_taken_port_is_a_clear_error(sqlite_url: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LightstudyError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(sqlite_url, port=port)


class Serving:
    """``lightstudy proxy`` serving ``pg_url`` in a thread, on a free port, until ``stop()``."""

    def __init__(self, pg_url: str) -> None:
        self.port = free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        ready, self._stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(
            target=serve, args=(pg_url,), kwargs={"port": self.port, "ready": ready, "stop": self._stop}, daemon=True
        )
        self.thread.start()
        assert ready.wait(60)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)


@pytest.fixture
def proxy_url(pg_url: str) -> Iterator[tuple[str, str]]:
    proxy = Serving(pg_url)
    yield pg_url, proxy.url
    proxy.stop()


def _connections(pg_url: str) -> int:
    import psycopg

    database = pg_url.rsplit("/", 1)[1]
    with psycopg.connect("postgresql://postgres@127.0.0.1/postgres", autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()[0])


@pytest.mark.postgres
def test_a_stopped_proxy_leaves_no_database_connection_open(pg_url: str) -> None:
    proxy = Serving(pg_url)
    client = open_storage(proxy.url)
    client.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    assert _connections(pg_url) > 0
    client.close()
    proxy.stop()
    assert not proxy.thread.is_alive()
    # A closed connection's server process ends soon after.
    wait_until(lambda: _connections(pg_url) == 0, 10, lambda: f"{_connections(pg_url)} connection(s) left open")


def _workers(
    grpc_url: str, run_dir: Path, n: int, warm_env: dict[str, str] | None = None
) -> list[subprocess.Popen[str]]:
    env = {
        **os.environ,
        "PYTHONPATH": PYTHONPATH,
        "LIGHTSTUDY_STORAGE": grpc_url,
        "PYTHONUNBUFFERED": "1",
        **(warm_env or {}),
    }
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lightstudy",
                "worker",
                "--study",
                "tiny",
                "--run-dir",
                str(run_dir),
                "--threads",
                "1",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(n)
    ]


def _fast(n_trials: int, **study: Any) -> dict[str, Any]:
    doc = tiny_spec(n_trials=n_trials, **study)
    doc["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    return doc


@pytest.mark.slow
def test_workers_behind_the_proxy_finish_the_study_holding_no_connections(
    proxy_url: tuple[str, str], tmp_path: Path
) -> None:
    pg_url, grpc_url = proxy_url
    doc = _fast(16)
    create_study(spec_from_dict(doc), grpc_url)
    peaks = [0]
    with warm_for_workers(doc) as warm_env:  # one warm process for the four, as under `lightstudy run`
        procs = _workers(grpc_url, tmp_path / "run", 4, warm_env)

        def ended() -> bool:  # the database's connections, noted while the workers run
            peaks.append(_connections(pg_url))
            return all(p.poll() is not None for p in procs)

        wait_until(ended, 500, "the workers' exit", interval=0.2)
    peak = max(peaks)
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    study, _ = load_study(pg_url, "tiny")
    trials = study.get_trials()
    states = [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    assert sorted(t.number for t in trials) == list(range(16)), states
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) > 1
    # Only the proxy holds connections (its pool and its reaper), whatever the number of workers.
    assert peak <= 8, peak


@pytest.mark.slow
def test_a_killed_worker_behind_the_proxy_is_reaped_and_retried(proxy_url: tuple[str, str], tmp_path: Path) -> None:
    pg_url, grpc_url = proxy_url
    doc = tiny_spec(n_trials=2, grace_period=3, heartbeat_interval=1)
    doc["model"]["class_path"] = "lightstudy_testing_models.SlowNet"
    doc["model"]["init_args"]["step_sleep"] = 0.03
    doc["trainer"]["max_epochs"] = 5
    create_study(spec_from_dict(doc), grpc_url)
    [victim] = _workers(grpc_url, tmp_path / "run", 1)
    last = tmp_path / "run" / "trials" / "trial-0000" / "checkpoints" / "last.ckpt"
    wait_until(last.exists, 180, "the trial's last.ckpt", proc=victim)
    victim.kill()
    victim.wait()
    # The survivor runs in this process (one interpreter start less), behind the proxy all the same.
    assert Worker(grpc_url, "tiny", run_dir=tmp_path / "run", threads=1).run().failed == 0
    study, _ = load_study(pg_url, "tiny")
    trials = study.get_trials()
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    assert any(t.user_attrs.get("resumed_from", {}).get("trial") == 0 for t in trials)
