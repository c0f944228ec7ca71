"""The cached pruners decide as Optuna's, and a check reads only what finished since the last."""

from __future__ import annotations

import math
import pickle
import random
from typing import Any

import numpy as np
import optuna
import pytest
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from conftest import tiny_spec
from lightstudy.components import build_pruner
from lightstudy.pruners import CachedMedianPruner, CachedPercentilePruner, nan_percentile
from lightstudy.spec import spec_from_dict

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::optuna.exceptions.ExperimentalWarning")


def _value(rng: random.Random) -> float:
    r = rng.random()
    if r < 0.05:
        return math.nan
    if r < 0.07:
        return rng.choice([math.inf, -math.inf])
    if r < 0.15:
        return float(rng.randint(0, 3))  # ties
    return rng.gauss(0.0, 1.0)


def _intermediate(rng: random.Random, steps: int) -> dict[int, float]:
    # Gaps: a trial reports only some steps, and not always from 0.
    return {s: _value(rng) for s in range(steps) if rng.random() < 0.8}


def _trial(rng: random.Random, state: TrialState, steps: int = 8) -> FrozenTrial:
    values = _intermediate(rng, steps)
    return create_trial(
        state=state,
        params={"x": rng.random()},
        distributions={"x": FloatDistribution(0, 1)},
        value=rng.random() if state == TrialState.COMPLETE else None,
        intermediate_values=values,
    )


def _memory_db() -> optuna.storages.RDBStorage:
    """An SQLite database in memory: the same SQL as a file, without a disk sync per trial."""
    return optuna.storages.RDBStorage("sqlite:///:memory:")


def _random_pruners(rng: random.Random) -> tuple[optuna.pruners.BasePruner, optuna.pruners.BasePruner]:
    kwargs: dict[str, Any] = {
        "n_startup_trials": rng.choice([0, 1, 3, 8]),
        "n_warmup_steps": rng.choice([0, 0, 2, 4]),
        "interval_steps": rng.choice([1, 1, 2, 3]),
        "n_min_trials": rng.choice([1, 1, 3, 10]),
    }
    if rng.random() < 0.5:
        return optuna.pruners.MedianPruner(**kwargs), CachedMedianPruner(**kwargs)
    percentile = rng.choice([0.0, 25.0, 50.0, 100.0, rng.uniform(0, 100)])
    return optuna.pruners.PercentilePruner(percentile, **kwargs), CachedPercentilePruner(percentile, **kwargs)


def _compare(storage: Any, seed: int, direction: str) -> int:
    """Grow a study in rounds; after each, the two pruners judge random running trials alike."""
    rng = random.Random(seed)
    study = optuna.create_study(storage=storage, direction=direction, study_name=f"s{seed}{direction}")
    theirs, ours = _random_pruners(rng)
    checks = 0
    for _ in range(6):
        states = [TrialState.COMPLETE] * 6 + [TrialState.PRUNED, TrialState.FAIL]
        study.add_trials([_trial(rng, rng.choice(states)) for _ in range(rng.randint(0, 6))])
        for _ in range(8):
            judged = _trial(rng, TrialState.RUNNING, steps=rng.randint(1, 10))
            assert bool(theirs.prune(study, judged)) == ours.prune(study, judged), (seed, direction, judged)
            checks += 1
    return checks


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize("seed", range(4))
def test_decisions_match_optunas_in_a_database(seed: int, direction: str) -> None:
    assert _compare(_memory_db(), seed, direction) == 48


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize("seed", range(6, 12))
def test_decisions_match_optunas_in_memory(seed: int, direction: str) -> None:
    assert _compare(optuna.storages.InMemoryStorage(), seed, direction) == 48


def test_a_worker_sees_trials_finished_by_others_and_retries() -> None:
    """A long-lived pruner: trials that were running when first seen and finish later (complete,
    pruned, failed and retried) are taken in when they finish, and only then."""
    url = _memory_db()
    rng = random.Random(3)
    study = optuna.create_study(storage=url, study_name="s")
    theirs, ours = optuna.pruners.MedianPruner(n_startup_trials=2), CachedMedianPruner(n_startup_trials=2)
    others = optuna.load_study(study_name="s", storage=url)  # another worker
    running = [others.ask() for _ in range(4)]
    for trial in running:
        for step in range(5):
            trial.report(rng.random(), step)

    def same() -> None:
        for _ in range(5):
            judged = _trial(rng, TrialState.RUNNING, steps=5)
            assert bool(theirs.prune(study, judged)) == ours.prune(study, judged)

    same()
    others.tell(running[0], 0.5)
    same()
    others.tell(running[1], state=TrialState.PRUNED)
    others.tell(running[2], state=TrialState.FAIL)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)
    retry(others, others._storage.get_trial(running[2]._trial_id))
    same()
    again = others.ask()  # pops the retry, with its inherited values
    others.tell(again, 0.1)
    others.tell(running[3], 0.2)
    study.add_trials([_trial(rng, TrialState.COMPLETE, steps=5) for _ in range(3)])
    same()
    assert len(ours._cache(study).complete) == 6


def test_a_check_reads_only_what_finished_since_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightstudy.storage.boundary import DatabaseStorage

    url = _memory_db()
    rng = random.Random(0)
    study = optuna.create_study(storage=url, study_name="s")
    study.add_trials([_trial(rng, TrialState.COMPLETE) for _ in range(50)])
    pruner = CachedMedianPruner()
    judged = _trial(rng, TrialState.RUNNING)
    pruner.prune(study, judged)  # the first check reads the study once

    listed: list[str] = []
    for cls in (optuna.storages.RDBStorage, type(study._storage)):
        for name in ("get_all_trials", "_get_trials"):
            if hasattr(cls, name):
                original = getattr(cls, name)
                monkeypatch.setattr(cls, name, lambda *a, _o=original, _n=name, **k: listed.append(_n) or _o(*a, **k))
    read: list[list[int]] = []
    original_read = DatabaseStorage.intermediate_values
    monkeypatch.setattr(
        DatabaseStorage, "intermediate_values", lambda self, ids: read.append(ids) or original_read(self, ids)
    )
    rows: list[int] = []
    engine = study._storage._backend.engine

    def count_rows(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        rows.append(1)

    sqlalchemy.event.listen(engine, "after_cursor_execute", count_rows)
    for _ in range(10):
        pruner.prune(study, judged)
    assert listed == [] and read == []
    assert len(rows) == 10  # one indexed query per check
    study.add_trials([_trial(rng, TrialState.COMPLETE) for _ in range(2)])
    pruner.prune(study, judged)
    assert listed == [] and len(read) == 1 and len(read[0]) == 2
    # Optuna's own pruner lists every trial on every check (which is what the spy sees).
    optuna.pruners.MedianPruner().prune(study, judged)
    assert listed
    sqlalchemy.event.remove(engine, "after_cursor_execute", count_rows)


def test_missed_trials_are_found_by_relisting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial committed under an id below one already read (PostgreSQL) is found later."""
    from lightstudy import pruners

    url = _memory_db()
    rng = random.Random(1)
    study = optuna.create_study(storage=url, study_name="s")
    study.add_trials([_trial(rng, TrialState.COMPLETE) for _ in range(5)])
    pruner = CachedPercentilePruner(30.0, n_startup_trials=0)
    judged = _trial(rng, TrialState.RUNNING)
    pruner.prune(study, judged)
    cache = pruner._cache(study)
    lost = max(cache.complete)
    cache.complete.discard(lost)  # as if its row had been invisible when the watermark passed it
    cache.counts.clear()
    cache.values.clear()
    for trial in study.get_trials(deepcopy=False):
        if trial._trial_id != lost:
            cache.add(trial.intermediate_values)
    monkeypatch.setattr(pruners, "RESYNC_SECONDS", 0.0)
    pruner.prune(study, judged)
    assert len(cache.complete) == 5
    assert sum(cache.counts.values()) == sum(len(t.intermediate_values) for t in study.trials)


def test_multi_objective_is_refused_like_optuna() -> None:
    study = optuna.create_study(directions=["minimize", "maximize"])
    rng = random.Random(0)
    for _ in range(6):
        study.add_trial(
            create_trial(
                values=[1.0, 2.0], params={}, distributions={}, intermediate_values=_intermediate(rng, 4) or {0: 1.0}
            )
        )
    judged = _trial(rng, TrialState.RUNNING, steps=4)
    with pytest.raises(RuntimeError) as theirs:
        optuna.pruners.MedianPruner().prune(study, judged)
    with pytest.raises(RuntimeError) as ours:
        CachedMedianPruner().prune(study, judged)
    assert str(ours.value) == str(theirs.value)


def test_arguments_are_checked_like_optuna() -> None:
    with pytest.raises(ValueError, match="Percentile must be between 0 and 100"):
        CachedPercentilePruner(101.0)
    with pytest.raises(ValueError, match="at least 1"):
        CachedMedianPruner(interval_steps=0)
    assert isinstance(CachedMedianPruner(), optuna.pruners.MedianPruner)


def test_a_pruner_pickles_without_its_cache() -> None:
    study = optuna.create_study()
    study.add_trial(create_trial(value=1.0, intermediate_values={0: 1.0}))
    pruner = CachedMedianPruner(n_startup_trials=0)
    pruner.prune(study, create_trial(state=TrialState.RUNNING, intermediate_values={0: 2.0}))
    copy = pickle.loads(pickle.dumps(pruner))
    assert copy._caches == {} and copy._n_startup_trials == 0


def test_nan_percentile_is_numpys() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        values = [_value(rng) for _ in range(rng.randint(1, 12))]
        q = rng.choice([0.0, 50.0, 100.0, rng.uniform(0, 100)])
        with np.errstate(invalid="ignore"):
            expected = float(np.nanpercentile(np.array(values, dtype=float), q))
        got = nan_percentile(sorted(v for v in values if not math.isnan(v)), q)
        assert got == expected or (math.isnan(got) and math.isnan(expected)), (values, q)


@pytest.mark.parametrize(
    ("pruner", "expected"),
    [
        ({"name": "MedianPruner", "n_warmup_steps": 2}, CachedMedianPruner),
        ({"name": "PercentilePruner", "percentile": 25.0}, CachedPercentilePruner),
        ({"class_path": "optuna.pruners.MedianPruner"}, CachedMedianPruner),
        ({"name": "HyperbandPruner"}, optuna.pruners.HyperbandPruner),
    ],
)
def test_the_spec_gets_the_cached_pruner(pruner: dict[str, Any], expected: type) -> None:
    spec = spec_from_dict(tiny_spec(pruner=pruner))
    assert type(build_pruner(spec)) is expected


def test_a_wrapped_pruner_is_cached_too() -> None:
    doc = tiny_spec(pruner={"name": "PatientPruner", "patience": 2, "wrapped_pruner": {"name": "MedianPruner"}})
    built = build_pruner(spec_from_dict(doc))
    assert type(built._wrapped_pruner) is CachedMedianPruner
