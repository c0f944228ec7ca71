from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import PrivateServer
from lightstudy.errors import StorageError
from lightstudy.storage import (
    ENV_VAR,
    check_url,
    open_storage,
    redact,
    resolve_url,
    retry_db,
    sqlite_path,
)
from lightstudy.storage.boundary import claim_lock


def test_resolution_order_flag_env_spec_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_url(None, None, "runs/x") == "sqlite:///runs/x/study.db"
    assert resolve_url(None, "sqlite:///spec.db", "runs/x") == "sqlite:///spec.db"
    monkeypatch.setenv(ENV_VAR, "sqlite:///env.db")
    assert resolve_url(None, "sqlite:///spec.db", "runs/x") == "sqlite:///env.db"
    assert resolve_url("sqlite:///flag.db", "sqlite:///spec.db", "runs/x") == "sqlite:///flag.db"
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(StorageError, match="no storage given"):
        resolve_url(None, None, None)


def test_passwords_never_shown() -> None:
    url = "postgresql+psycopg://alice:s3cret@db.example:5432/studies"
    assert "s3cret" not in redact(url)
    assert "alice" in redact(url)
    with pytest.raises(StorageError) as info:
        check_url("mongodb://alice:s3cret@db/x")
    assert "s3cret" not in str(info.value)


def test_unreachable_postgres_error_hides_password() -> None:
    with pytest.raises(StorageError) as info:
        open_storage("postgresql+psycopg://alice:s3cret@127.0.0.1:1/none")
    assert "s3cret" not in str(info.value)
    assert "cannot open storage" in str(info.value)


def test_sqlite_is_created_in_wal_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a' / 'study.db'}"
    open_storage(url)
    path = sqlite_path(url)
    assert path is not None and path.exists()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reading_a_missing_sqlite_database_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no study database"):
        open_storage(f"sqlite:///{tmp_path / 'none.db'}", create=False)
    assert not list(tmp_path.iterdir())


def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "study.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StorageError, match="not a SQLite database"):
        open_storage(f"sqlite:///{path}")
    assert path.read_bytes() == b"not a database" * 100


def _exclusive(url: str) -> None:
    storage = open_storage(url)
    inside = []
    overlaps = []

    def hold() -> None:
        with claim_lock(storage, "s"):
            if inside:
                overlaps.append(True)
            inside.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps


def test_preload_pays_the_first_opens_imports_and_touches_no_database(tmp_path: Path) -> None:
    """What lightstudy run does while its warm process imports torch: Optuna's
    storage, its ORM models, Alembic's migration scripts and the PostgreSQL driver are loaded,
    and no file appears (an in-memory database); the next open of a real database still works."""
    code = (
        "import sys\n"
        "from lightstudy.storage import open_storage, preload\n"
        "before = {m for m in ('optuna.storages._rdb.models', 'alembic.script', 'psycopg') if m in sys.modules}\n"
        "preload('postgresql://someone@nowhere.invalid/db')\n"
        "after = {m for m in ('optuna.storages._rdb.models', 'alembic.script', 'psycopg') if m in sys.modules}\n"
        "print(sorted(before), sorted(after))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("] [") == ["[", "'alembic.script', 'optuna.storages._rdb.models', 'psycopg']\n"]
    assert list(tmp_path.iterdir()) == []
    from lightstudy.storage import open_storage, preload

    preload()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_storage(url).create_new_study([], "after-preload")
    assert (tmp_path / "study.db").exists()


def test_claim_lock_is_exclusive_on_sqlite(sqlite_url: str) -> None:
    _exclusive(sqlite_url)


@pytest.mark.postgres
def test_claim_lock_is_exclusive_on_postgres(pg_url: str) -> None:
    _exclusive(pg_url)


def test_retry_db_retries_connection_errors_only() -> None:
    import sqlalchemy.exc

    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise sqlalchemy.exc.OperationalError("select", {}, Exception("server closed the connection"))
        return 7

    assert retry_db(flaky, what="test") == 7
    assert len(calls) == 3
    with pytest.raises(ValueError):
        retry_db(lambda: (_ for _ in ()).throw(ValueError("no")), what="test")


def test_a_plain_postgresql_url_uses_psycopg(pg_url: str) -> None:
    """`postgresql://` (no driver, as most users write it) failed with "an exception is raised
    during the commit" (SQLAlchemy's default driver, psycopg2, is not installed)."""
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    storage = open_storage(plain)
    assert str(storage.url).startswith("postgresql+psycopg://")
    assert storage.get_all_studies() == []


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("mysql://u@127.0.0.1/x", "driver 'mysqldb' is not installed"),
        ("mysql+pymysql://u@127.0.0.1/x", "driver 'pymysql' is not installed"),
        ("postgresql+psycopg2://u@127.0.0.1/x", "driver 'psycopg2' is not installed"),
    ],
)
def test_a_url_whose_driver_is_missing_is_one_line(url: str, said: str) -> None:
    """`mysql://...` gave an ImportError traceback from Optuna."""
    from conftest import run_cli

    done = run_cli("status", "--storage", url)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and "fix:" in lines[0], done.stderr


@pytest.mark.parametrize("version", ["v9.9.9", "v3.0.0.d"], ids=["newer", "older"])
def test_an_unknown_optuna_schema_is_refused_in_one_line(tmp_path: Path, version: str) -> None:
    """The raw queries of lightstudy.storage are written against one Optuna schema: a database of
    another is refused, naming the version, not misread."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_storage(url)
    with sqlite3.connect(tmp_path / "study.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = ?", (version,))
    with pytest.raises(StorageError, match=f"Optuna schema version '{version}' is not one lightstudy knows") as info:
        open_storage(url, create=False)
    assert "fix:" in str(info.value) and "\n" not in str(info.value)


def test_the_known_schema_is_the_one_optuna_creates(sqlite_url: str) -> None:
    from lightstudy.storage import SCHEMA_VERSIONS

    assert open_storage(sqlite_url).get_current_version() in SCHEMA_VERSIONS


def test_a_reaped_trials_retry_inherits_no_attempt_attrs(sqlite_url: str) -> None:
    import datetime

    import sqlalchemy
    from optuna.trial import TrialState

    from conftest import tiny_spec
    from lightstudy.spec import spec_from_dict
    from lightstudy.storage.boundary import ATTEMPT_ATTRS, DatabaseStorage, storage_of, trial_id
    from lightstudy.study import create_study, load_study

    create_study(spec_from_dict(tiny_spec(grace_period=2)), sqlite_url)
    study, _ = load_study(sqlite_url, "tiny")
    db = storage_of(study)
    assert isinstance(db, DatabaseStorage)
    trial = study.ask()
    db.set_trial_attrs(trial_id(trial), {**{key: "attempt 1" for key in ATTEMPT_ATTRS}, "note": "kept"})
    db.beat(trial_id(trial))
    # Its worker died long ago: the last heartbeat is an hour old.
    with db.rdb.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = :t WHERE trial_id = :id"),
            {"t": datetime.datetime.now() - datetime.timedelta(hours=1), "id": trial_id(trial)},
        )
    db.reap(study, grace_period=2)
    assert db.trial(trial_id(trial)).state == TrialState.FAIL
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.system_attrs["failed_trial"] == trial.number
    assert retry.params == trial.params
    assert retry.user_attrs == {"note": "kept"}


def test_waiting_for_a_database_that_never_comes_gives_up_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import free_port

    monkeypatch.setattr("lightstudy.storage.DB_RETRY_SECONDS", 1.0)  # not the 180 s a worker waits
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot open storage .*\(waited 1 s\)"):
        open_storage(url, create=False, wait=True)
    assert 0.5 < time.monotonic() - started < 10
    assert "database unavailable" in caplog.text
    caplog.clear()
    with pytest.raises(StorageError, match="cannot open storage") as raised:  # without wait: at once
        open_storage(url, create=False)
    assert "waited" not in str(raised.value)
    assert "database unavailable" not in caplog.text


def _worker(url: str, run_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LIGHTSTUDY_STORAGE": url, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lightstudy", "worker", "--study", "tiny", "--run-dir", str(run_dir), "--threads", "1"]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_worker_started_while_the_database_is_down_waits_for_it(
    private_postgres: PrivateServer, tmp_path: Path
) -> None:
    from optuna.trial import TrialState

    from conftest import tiny_spec
    from lightstudy.spec import spec_from_dict
    from lightstudy.study import create_study, load_study

    url = private_postgres.url
    create_study(spec_from_dict(tiny_spec(n_trials=1, max_epochs=1)), url)
    private_postgres.stop()
    log = tmp_path / "worker.log"
    proc = _worker(url, tmp_path / "run", log)
    try:
        deadline = time.monotonic() + 120  # the worker is up and waiting for the database
        while "database unavailable" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert proc.poll() is None, log.read_text()  # it waits instead of exiting 2
        private_postgres.start()
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    study, _ = load_study(url, "tiny")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]

    # What the user must fix is no outage: a database that does not exist fails at once.
    missing = url.rsplit("/", 1)[0] + "/ls_fixes_no_such_database"
    started = time.monotonic()
    proc = _worker(missing, tmp_path / "run2", log)
    assert proc.wait(timeout=120) == 2, log.read_text()
    out = log.read_text()
    assert "does not exist" in out and "database unavailable" not in out, out
    assert time.monotonic() - started < 60  # the interpreter's start-up, not DB_RETRY_SECONDS


@pytest.mark.parametrize(
    ("said", "outage"),
    [
        ('connection to server at "127.0.0.1", port 5432 failed: Connection refused', True),
        ("FATAL:  the database system is starting up", True),
        ('FATAL:  database "nope" does not exist', False),
        ('FATAL:  password authentication failed for user "ada"', False),
        ('FATAL:  role "ada" does not exist', False),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.2", user "ada"', False),
    ],
)
def test_only_an_absent_database_server_is_waited_for(said: str, outage: bool) -> None:
    import sqlalchemy.exc

    from lightstudy.storage import _is_outage

    assert _is_outage(sqlalchemy.exc.OperationalError("connect", {}, Exception(said))) is outage
    assert not _is_outage(ValueError(said))  # not a connection error at all


# --- study.storage_options: synchronous_commit for the workers' sessions ---------------------


def _show_synchronous_commit(db: object) -> str:
    import sqlalchemy

    with db.rdb.engine.connect() as conn:  # type: ignore[attr-defined]
        return str(conn.execute(sqlalchemy.text("SHOW synchronous_commit")).scalar_one())


@pytest.mark.postgres
def test_synchronous_commit_off_applies_to_the_workers_sessions_only(pg_url: str, tmp_path: Path) -> None:
    from conftest import tiny_spec
    from lightstudy.spec import spec_from_dict
    from lightstudy.storage.boundary import storage_of
    from lightstudy.study import create_study, load_study
    from lightstudy.worker import Worker

    spec = spec_from_dict(tiny_spec(storage_options={"synchronous_commit": False}))  # YAML's bare `off`
    assert spec.study.storage_options.synchronous_commit == "off"
    create_study(spec, pg_url)
    worker = Worker(pg_url, "tiny", run_dir=tmp_path)
    assert _show_synchronous_commit(worker.db) == "off"
    study, _ = load_study(pg_url, "tiny")  # a reader (best, report, the CLI's own session) keeps the default
    assert _show_synchronous_commit(storage_of(study)) == "on"


@pytest.mark.postgres
def test_synchronous_commit_is_on_unless_the_spec_says_off(pg_url: str, tmp_path: Path) -> None:
    from conftest import tiny_spec
    from lightstudy.spec import spec_from_dict
    from lightstudy.study import create_study
    from lightstudy.worker import Worker

    spec = spec_from_dict(tiny_spec())
    assert "storage_options" not in spec.to_dict()["study"]  # the default leaves old fingerprints alone
    create_study(spec, pg_url)
    assert _show_synchronous_commit(Worker(pg_url, "tiny", run_dir=tmp_path).db) == "on"


def test_synchronous_commit_off_on_sqlite_stops_the_workers_wal_syncs_only(sqlite_url: str, tmp_path: Path) -> None:
    """SQLite's counterpart: PRAGMA synchronous=NORMAL (WAL mode: no sync per commit; a machine
    crash, not a process crash, can lose the last commits) on the workers' connections only."""
    import sqlalchemy

    from conftest import tiny_spec
    from lightstudy.spec import spec_from_dict
    from lightstudy.storage.boundary import storage_of
    from lightstudy.study import create_study, load_study
    from lightstudy.worker import Worker

    def synchronous(db: Any) -> int:
        with db.rdb.engine.connect() as conn:
            return int(conn.execute(sqlalchemy.text("PRAGMA synchronous")).scalar_one())

    create_study(spec_from_dict(tiny_spec(storage_options={"synchronous_commit": "off"})), sqlite_url)
    worker = Worker(sqlite_url, "tiny", run_dir=tmp_path)
    assert synchronous(worker.db) == 1  # NORMAL
    study, _ = load_study(sqlite_url, "tiny")
    assert synchronous(storage_of(study)) == 2  # FULL, SQLite's default, for every other session
    worker.db.set_session_options("on")
    assert synchronous(worker.db) == 2


def test_storage_options_round_trip_through_the_stored_spec() -> None:
    from conftest import tiny_spec
    from lightstudy.spec import spec_from_dict

    spec = spec_from_dict(tiny_spec(storage_options={"synchronous_commit": "off"}))
    assert spec.to_dict()["study"]["storage_options"] == {"synchronous_commit": "off"}
    assert spec_from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ("{synchronous_commit: maybe}", "study.storage_options.synchronous_commit: must be on or off, but got 'maybe'"),
        ("{sync: off}", "study.storage_options.sync: is not a key of storage_options"),
        ("off", "study.storage_options: must be a mapping"),
    ],
    ids=["value", "key", "not-a-mapping"],
)
def test_bad_storage_options_exit_2_in_one_line(tmp_path: Path, options: str, said: str) -> None:
    import yaml

    from conftest import cli, tiny_spec

    text = yaml.safe_dump(tiny_spec(), sort_keys=False)
    text = text.replace("study:\n", f"study:\n  storage_options: {options}\n", 1)
    (tmp_path / "s.yaml").write_text(text)
    result = cli("validate", "s.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and "fix:" in lines[0], lines


# --- an epoch's report and pruning check: one transaction ------------------------------------


def _pruned_study(url: str, pruner: Any) -> Any:
    import optuna

    from lightstudy.storage import open_storage

    study = optuna.create_study(storage=open_storage(url), study_name="epochs", pruner=pruner, direction="maximize")
    for k in range(3):  # finished trials the pruner compares with
        done = study.ask()
        for step in range(3):
            done.report(float(k), step)
        study.tell(done, float(k))
    return study


def _transactions(engine: Any) -> dict[str, int]:
    """Transactions begun and committed on ``engine`` from now on (reads begin one too)."""
    import sqlalchemy

    seen = {"begin": 0, "commit": 0}
    for event in seen:
        sqlalchemy.event.listen(engine, event, lambda conn, event=event: seen.__setitem__(event, seen[event] + 1))
    return seen


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_an_epochs_report_and_pruning_check_are_one_transaction(backend: str, request: pytest.FixtureRequest) -> None:
    import lightstudy.pruners
    from lightstudy.storage.boundary import storage_of, trial_id
    from lightstudy.trial import Report, ShouldPrune
    from lightstudy.worker import _answer

    url = request.getfixturevalue("pg_url" if backend == "postgresql" else "sqlite_url")
    study = _pruned_study(url, lightstudy.pruners.CachedMedianPruner(n_startup_trials=1, n_warmup_steps=2))
    db = storage_of(study)
    trial = study.ask()
    answer = _answer(db, trial)
    transactions = _transactions(db.rdb.engine)  # type: ignore[attr-defined]
    verdicts = []
    for step, value in enumerate([0.1, 0.2, 0.5]):
        answer(Report(value, step))
        verdicts.append(answer(ShouldPrune()))
    # Below the median (1.0) throughout; only step 2 is past the warm-up: True says the check saw it.
    assert verdicts == [False, False, True]
    assert transactions == {"begin": 3, "commit": 3}, "one transaction per epoch (report + pruning check)"
    assert db.trial(trial_id(trial)).intermediate_values == {0: 0.1, 1: 0.2, 2: 0.5}


def test_a_report_whose_pruning_check_never_comes_is_written_by_flush(sqlite_url: str) -> None:
    import optuna

    from lightstudy.storage.boundary import storage_of, trial_id
    from lightstudy.trial import RecordAttr, Report
    from lightstudy.worker import _answer

    study = _pruned_study(sqlite_url, optuna.pruners.MedianPruner())
    db = storage_of(study)
    trial = study.ask()
    answer = _answer(db, trial)
    answer(Report(0.5, 0))
    answer(RecordAttr("note", "x"))  # another message writes the waiting report first
    answer(Report(0.7, 1))
    assert db.trial(trial_id(trial)).intermediate_values == {0: 0.5}
    answer.flush()  # the trial process died before asking
    assert db.trial(trial_id(trial)).intermediate_values == {0: 0.5, 1: 0.7}


def test_a_report_on_a_finished_trial_is_refused_as_optuna_refuses_it(sqlite_url: str) -> None:
    from optuna.exceptions import UpdateFinishedTrialError

    import lightstudy.pruners
    from lightstudy.storage.boundary import storage_of

    study = _pruned_study(sqlite_url, lightstudy.pruners.CachedMedianPruner())
    trial = study.ask()
    study.tell(trial, 1.0)
    with pytest.raises(UpdateFinishedTrialError):
        storage_of(study).report_and_prune(trial, 0.5, 0)
    assert 0 not in trial._cached_frozen_trial.intermediate_values  # not written, not remembered


@pytest.mark.postgres
def test_a_connection_the_server_dropped_is_replaced_without_an_error(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections are pinged only after sitting idle (not on every checkout, a round trip per
    query); an idle one the server dropped is replaced on checkout, and one dropped within the
    idle time fails on use, which retry_db repeats on a new connection."""
    import optuna
    import psycopg
    import sqlalchemy

    import lightstudy.storage
    from conftest import PG_BASE
    from lightstudy.storage.boundary import wrap

    storage = open_storage(pg_url)
    study = optuna.create_study(storage=storage, study_name="drop")
    trial = study.ask()
    db = wrap(storage)
    admin = PG_BASE.replace("postgresql+psycopg://", "postgresql://") + "/postgres"

    database = pg_url.rsplit("/", 1)[1]

    def drop_pooled() -> None:  # as a server restart would: every connection of this process
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))

    monkeypatch.setattr(lightstudy.storage, "PING_IDLE_SECONDS", 0.0)  # every pooled one is "idle"
    drop_pooled()
    with storage.engine.connect() as conn:  # pinged, found dead, replaced: no error
        assert conn.execute(sqlalchemy.text("SELECT 1")).scalar_one() == 1
    monkeypatch.setattr(lightstudy.storage, "PING_IDLE_SECONDS", 3600.0)  # none is pinged
    drop_pooled()
    assert db.state(trial._trial_id).name == "RUNNING"  # failed on use, retried by retry_db


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "memory"])
def test_write_note_stores_what_dashboards_save_note_stores(backend: str, request: pytest.FixtureRequest) -> None:
    """What write_note stores is what optuna-dashboard's own save_note stores, note by note: the
    same attrs (a version one up, the parts, a shorter body blanking a longer one's extra part),
    which its get_note reads back; trial 1's note leaves trial 12's alone (one's prefix is the
    other's start but for the colon; "_" and "%" are LIKE wildcards)."""
    import optuna
    from optuna_dashboard import get_note, save_note
    from optuna_dashboard._note import note_str_key_prefix, note_ver_key, split_body

    from lightstudy.storage.boundary import storage_of, study_id

    if backend == "memory":
        storage: Any = optuna.storages.InMemoryStorage()
    else:
        storage = open_storage(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))
    ours, theirs = (optuna.create_study(storage=storage, study_name=name) for name in ("ours", "theirs"))
    for study in (ours, theirs):
        for _ in range(13):
            study.ask()

    def layout(study: optuna.Study) -> dict[tuple[int, str], Any]:  # (trial number, key after its id) -> value
        number = {t._trial_id: t.number for t in study.trials}
        attrs = storage.get_study_system_attrs(study_id(study))
        return {(number[int(key.split(":")[1])], key.split(":", 2)[2]): value for key, value in attrs.items()}

    for body in ("x" * 3000 + "y", "short", "", "a_%\\b" * 500):  # two parts, one, none, two
        for number in (1, 12):
            text = f"{body} (trial {number})"
            save_note(optuna.trial.Trial(theirs, theirs.trials[number]._trial_id), text)
            tid = ours.trials[number]._trial_id
            storage_of(ours).write_note(ours, note_ver_key(tid), split_body(text, tid), note_str_key_prefix(tid))
            assert get_note(optuna.trial.Trial(ours, tid)) == text
        assert layout(ours) == layout(theirs)
    assert layout(ours)[(12, "note_ver")] == 4
