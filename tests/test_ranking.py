from __future__ import annotations

import math
import random

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState, create_trial

from conftest import tiny_spec
from lightstudy import ranking
from lightstudy.checkpoints import kept_trials
from lightstudy.spec import StudySpec, spec_from_dict

CHECKPOINT = {"checkpoint": {"artifact_id": "a", "filename": "a.ckpt"}}


def _spec(keep: int, *, objectives: int = 1) -> StudySpec:
    doc = tiny_spec(checkpoints={"keep": keep})
    if objectives > 1:
        del doc["study"]["direction"], doc["study"]["metric"]
        doc["study"].update(directions=["maximize", "minimize"], metrics=["val_acc", "param_count"])
    return spec_from_dict(doc)


def _trials(*values: float | list[float] | None, checkpoint: bool = False) -> list[FrozenTrial]:
    """Trials numbered 0, 1, ...: a number or list is a complete trial's value(s), None a pruned trial."""
    out = []
    for number, value in enumerate(values):
        if value is None:
            trial = create_trial(state=TrialState.PRUNED)
        else:
            vals = value if isinstance(value, list) else [value]
            attrs = dict(CHECKPOINT) if checkpoint else {}
            trial = create_trial(state=TrialState.COMPLETE, values=vals, user_attrs=attrs)
        trial.number = number
        out.append(trial)
    return out


def _numbers(trials: list[FrozenTrial]) -> list[int]:
    return [t.number for t in trials]


def test_one_objective_best_first_ties_by_number_in_either_direction() -> None:
    trials = _trials(0.5, 0.9, None, 0.7, 0.9, math.inf)
    assert _numbers(ranking.best_first(trials, ["maximize"])) == [5, 1, 4, 3, 0]
    assert _numbers(ranking.best_first(trials, ["minimize"])) == [0, 3, 1, 4, 5]
    # Optuna's own directions work the same (a loaded study's `directions`).
    assert _numbers(ranking.best_first(trials, [StudyDirection.MINIMIZE])) == [0, 3, 1, 4, 5]


def test_complete_trials_without_a_usable_value_come_last_by_number() -> None:
    trials = _trials(0.5, 0.9, 0.7)
    trials[0]._values = None  # as another client's storage may hold them; Optuna's validation refuses both
    trials[2]._values = [math.nan]
    assert not ranking.has_value(trials[0]) and not ranking.has_value(trials[2])
    assert _numbers(ranking.best_first(trials, ["maximize"])) == [1, 0, 2]
    assert _numbers(ranking.best_first(trials, ["minimize"])) == [1, 0, 2]
    # Never on a Pareto front.
    two = _trials([0.5, 1.0], [0.9, 2.0])
    two[1]._values = [math.nan, 0.0]
    assert _numbers(ranking.best_first(two, ["maximize", "minimize"])) == [0]


@pytest.mark.parametrize("seed", range(5))
def test_the_pareto_front_is_optunas_best_trials(seed: int) -> None:
    rng = random.Random(seed)
    directions = ["maximize", "minimize", "maximize"][: 2 + seed % 2]
    study = optuna.create_study(directions=directions)
    for _ in range(60):
        # Few distinct values: many ties and duplicates; an infinity now and then.
        values = [rng.choice([0.0, 1.0, 2.0, 3.0, math.inf]) for _ in directions]
        study.add_trial(create_trial(state=TrialState.COMPLETE, values=values))
        if rng.random() < 0.2:
            study.add_trial(create_trial(state=TrialState.PRUNED))
    trials = study.get_trials()
    expected = sorted(t.number for t in study.best_trials)
    assert _numbers(ranking.pareto_front(trials, directions)) == expected
    assert _numbers(ranking.best_first(trials, directions)) == expected
    shuffled = trials[:]
    rng.shuffle(shuffled)
    assert _numbers(ranking.pareto_front(shuffled, directions)) == expected  # by number, whatever the order


def test_top_k_and_the_kept_set() -> None:
    single = _spec(2)
    trials = _trials(0.5, 0.9, 0.7, 0.9, checkpoint=True)
    trials += _trials(0.95)  # trial 0 again, with no checkpoint
    trials[-1].number = 4
    assert _numbers(ranking.top_k(trials, ["maximize"], 2)) == [4, 1]
    assert _numbers(ranking.kept(trials, single)) == [1, 3]  # only trials with a stored checkpoint
    assert ranking.top_k(trials, ["maximize"], 0) == []
    multi = _spec(1, objectives=2)
    front = _trials([0.9, 10.0], [0.8, 5.0], [0.7, 20.0], checkpoint=True)
    assert _numbers(ranking.kept(front, multi)) == [0, 1]  # several objectives: the whole front


@pytest.mark.parametrize("seed", range(4))
def test_would_keep_agrees_with_the_kept_set_after_the_trial(seed: int) -> None:
    """A trial enters the kept set exactly when it is in the kept set recomputed after it completed,
    and the kept set of checkpoints.py (the worker's retention) is this module's."""
    rng = random.Random(seed)
    spec = _spec(3, objectives=1 + seed % 2)
    trials: list[FrozenTrial] = []
    for number in range(40):
        values = [float(rng.randint(0, 6)) for _ in spec.study.directions]
        keep = ranking.would_keep(trials, spec, number, values)
        trial = create_trial(state=TrialState.COMPLETE, values=values, user_attrs=dict(CHECKPOINT) if keep else {})
        trial.number = number
        trials.append(trial)
        kept = ranking.kept(trials, spec)
        assert (number in _numbers(kept)) == keep, (number, values)
        assert _numbers(kept_trials(trials, spec)) == _numbers(kept)
        # Retention removes the rest; what stays is exactly the kept set.
        for t in trials:
            if t.number not in _numbers(kept):
                t.user_attrs.pop("checkpoint", None)


def test_would_keep_ties_nothing_kept_and_a_trial_without_value() -> None:
    spec = _spec(1)
    trials = _trials(0.8, checkpoint=True)
    assert ranking.would_keep(trials, spec, 5, [0.9])
    assert not ranking.would_keep(trials, spec, 5, [0.8])  # a tie: the lower number stays
    assert not ranking.would_keep(trials, _spec(0), 5, [1.0])
    assert not ranking.would_keep(trials, spec, 5, [math.nan])  # ranks after every trial with a value
    assert ranking.would_keep([], spec, 5, [math.nan])  # ... but the kept set has room
