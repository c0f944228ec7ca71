from __future__ import annotations

import datetime
import threading
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from conftest import tiny_spec
from lightstudy.errors import LightstudyError, StudyNotFoundError
from lightstudy.spec import spec_from_dict
from lightstudy.study import FINGERPRINT_ATTR, SPEC_ATTR, budget, claim_trial, create_study, load_study


def test_create_stores_the_spec_and_is_idempotent(sqlite_url: str) -> None:
    spec = spec_from_dict(tiny_spec())
    study = create_study(spec, sqlite_url)
    assert study.user_attrs[SPEC_ATTR]["study"]["name"] == "tiny"
    assert study.user_attrs[FINGERPRINT_ATTR] == spec.fingerprint()
    create_study(spec, sqlite_url)
    _loaded, again = load_study(sqlite_url, "tiny")
    assert again.to_dict(with_storage=False) == spec.to_dict(with_storage=False)
    assert len(optuna.get_all_study_summaries(sqlite_url)) == 1


def test_stored_spec_has_no_password(pg_url: str) -> None:
    doc = tiny_spec()
    doc["study"]["storage"] = pg_url.replace("postgres@", "postgres:hunter2@")
    spec = spec_from_dict(doc)
    study = create_study(spec, pg_url)
    assert "hunter2" not in str(study.user_attrs)


def test_a_different_spec_is_an_error_unless_asked(sqlite_url: str) -> None:
    create_study(spec_from_dict(tiny_spec()), sqlite_url)
    changed = spec_from_dict(tiny_spec(n_trials=9))
    with pytest.raises(LightstudyError, match=r"changed: study\.n_trials") as info:
        create_study(changed, sqlite_url)
    assert "--update-spec" in str(info.value)
    create_study(changed, sqlite_url, update_spec=True)
    assert load_study(sqlite_url, "tiny")[1].study.n_trials == 9


def test_directions_cannot_change(sqlite_url: str) -> None:
    create_study(spec_from_dict(tiny_spec()), sqlite_url)
    doc = tiny_spec(direction="minimize", metric="val_loss")
    with pytest.raises(LightstudyError, match="directions cannot change"):
        create_study(spec_from_dict(doc), sqlite_url, update_spec=True)


def test_missing_study_lists_those_there(sqlite_url: str) -> None:
    create_study(spec_from_dict(tiny_spec()), sqlite_url)
    with pytest.raises(StudyNotFoundError, match="studies there: tiny"):
        load_study(sqlite_url, "other")


def test_a_foreign_study_is_refused(sqlite_url: str) -> None:
    optuna.create_study(storage=sqlite_url, study_name="plain")
    with pytest.raises(LightstudyError, match="not created by lightstudy"):
        load_study(sqlite_url, "plain")


def _trial(state: TrialState, number_attrs: dict | None = None, value: float | None = 0.5):
    return optuna.trial.create_trial(
        state=state,
        value=value if state == TrialState.COMPLETE else None,
        system_attrs=number_attrs or {},
    )


def test_budget_counts_failures_that_were_not_retried() -> None:
    spec = spec_from_dict(tiny_spec(n_trials=4))
    study = optuna.create_study()
    study.add_trial(_trial(TrialState.COMPLETE))
    study.add_trial(_trial(TrialState.FAIL))  # 1: retried below
    study.add_trial(_trial(TrialState.WAITING, {"failed_trial": 1, "retry_history": [1]}))
    study.add_trial(_trial(TrialState.FAIL))  # 3: a real failure, counts
    trials = study.get_trials()
    b = budget(trials, spec)
    assert (b.used, b.waiting, b.full) == (3, 1, False)
    study.add_trial(_trial(TrialState.PRUNED))
    b = budget(study.get_trials(), spec)
    assert b.full and b.may_claim  # the waiting retry still runs
    assert not b.done


def test_budget_timeout_is_study_wide_from_the_first_trial() -> None:
    spec = spec_from_dict(tiny_spec(n_trials=None, timeout=60))
    study = optuna.create_study()
    study.add_trial(_trial(TrialState.COMPLETE))
    trials = study.get_trials()
    start = trials[0].datetime_start
    assert not budget(trials, spec, now=start + datetime.timedelta(seconds=59)).timed_out
    late = budget(trials, spec, now=start + datetime.timedelta(seconds=61))
    assert late.timed_out and late.done


def _claim_all(url: str, name: str, results: list) -> None:
    study, spec = load_study(url, name)
    while True:
        trial, _ = claim_trial(study, spec)
        if trial is None:
            return
        results.append(trial.number)
        study.tell(trial, 0.5)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_claims_never_overshoot(backend: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    create_study(spec_from_dict(tiny_spec(n_trials=12)), url)
    results: list[int] = []
    threads = [threading.Thread(target=_claim_all, args=(url, "tiny", results)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(12))
    study, _ = load_study(url, "tiny")
    assert len(study.get_trials()) == 12


@pytest.mark.postgres
def test_a_claim_the_database_broke_is_redone_whole(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL restart drops the claim lock with its connection, so another worker claims
    while this claim's step waits for the database. Retried step by step, the claim asked with the
    budget it had counted before the restart, from the same sampler seed: two lineages of one
    configuration (a CI chaos run, seed 1). The claim is redone whole: the lock taken again, the
    budget counted again."""
    import psycopg
    import sqlalchemy.exc

    from conftest import PG_BASE
    from lightstudy.storage import retry_db

    create_study(spec_from_dict(tiny_spec(n_trials=5)), pg_url)
    study, spec = load_study(pg_url, "tiny")
    other, _ = load_study(pg_url, "tiny")
    database = pg_url.rsplit("/", 1)[1]
    admin = PG_BASE.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    ask, raced = study.ask, []

    def ask_as_the_database_restarts(*args: Any, **kwargs: Any) -> optuna.Trial:
        if not raced:  # the restart: the lock's connection is cut, the other worker claims meanwhile
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND d.datname = %s",
                    (database,),
                )
            trial, _ = claim_trial(other, spec)
            raced.append(trial)
            raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
        return ask(*args, **kwargs)

    monkeypatch.setattr(study, "ask", ask_as_the_database_restarts)
    trial, _ = retry_db(lambda: claim_trial(study, spec), what="claim a trial")  # as the worker claims
    assert trial is not None and raced[0] is not None
    assert (raced[0].number, trial.number) == (0, 1)
    assert trial.params != raced[0].params


def test_claims_sample_different_parameters_per_claim(sqlite_url: str) -> None:
    create_study(spec_from_dict(tiny_spec(n_trials=5)), sqlite_url)
    study, spec = load_study(sqlite_url, "tiny")
    seen = set()
    for _ in range(5):
        trial, _ = claim_trial(study, spec)
        assert trial is not None
        seen.add(trial.params["model.init_args.lr"])
        study.tell(trial, 0.5)
    assert len(seen) == 5


def test_a_claim_that_never_beat_is_reaped_and_retried(sqlite_url: str) -> None:
    from lightstudy.study import reap_unbeaten

    spec = spec_from_dict(tiny_spec(n_trials=3))  # grace_period 3 s
    create_study(spec, sqlite_url)
    study, spec = load_study(sqlite_url, "tiny")
    orphan = study.ask()  # a claim that broke before its first heartbeat
    assert reap_unbeaten(study, spec) == 0  # not yet past the grace period
    later = datetime.datetime.now() + datetime.timedelta(seconds=spec.study.grace_period + 0.5)
    assert reap_unbeaten(study, spec, now=later) == 1  # an injected clock, not a wait
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    assert study.get_trials()[1].system_attrs["failed_trial"] == orphan.number


def _grid_doc(n_trials: int | None = 20) -> dict[str, Any]:
    # (a long grace period: the claimed trials below never beat again, and must not go stale)
    doc = tiny_spec("grid", n_trials=n_trials, sampler="GridSampler", grace_period=600)
    doc["search_space"] = {  # 4 x 3 = 12 points
        "data.init_args.batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]},
        "model.init_args.lr": {"type": "categorical", "choices": [0.001, 0.01, 0.03]},
    }
    return doc


def test_a_grid_study_claims_every_point_once_and_then_is_done(sqlite_url: str) -> None:
    """GridSampler's after_trial called study.stop() outside optimize (RuntimeError in tell), and
    past its grid it re-ran points: the grid, not n_trials (20 here), ends a grid study."""
    from lightstudy.study import count_budget, tell

    create_study(spec_from_dict(_grid_doc()), sqlite_url)
    study, spec = load_study(sqlite_url, "grid")
    running = []
    for _ in range(12):  # every point claimed while none has finished (12 workers at once)
        trial, _ = claim_trial(study, spec)
        assert trial is not None
        running.append(trial)
    trial, state = claim_trial(study, spec)
    assert trial is None and not state.may_claim and not state.done  # running ones may still fail
    for t in running:
        tell(study, t, [0.5], TrialState.COMPLETE)  # the last one used to raise in study.stop()
    assert count_budget(study, spec)[0].done
    points = {tuple(sorted(t.params.items())) for t in study.get_trials()}
    assert len(points) == 12 and len(study.get_trials()) == 12
