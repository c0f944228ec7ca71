"""Which trials are best: the one place that orders a study's trials.

- **One objective**: the complete trials by value in the study's direction, ties by lower trial
  number; a complete trial without a usable value (none recorded, or NaN) comes after every trial
  with one, by number.
- **Several objectives**: the Pareto front, as Optuna's ``Study.best_trials`` computes it, by
  number (a front has no order of its own).
- **The kept set** (``checkpoints.keep``): the first k of that order among the trials with a
  stored checkpoint (several objectives: the whole front).

- **With a scheduler** (``study.scheduler``): only the lineages' furthest trials rank (see
  :func:`lightstudy.scheduler.finals`): the trials at the highest rung reached (ASHA), or with the
  most epochs trained (PBT: the final members). A lower rung's value came from fewer epochs.

Every command that shows, picks or keeps "the best" asks this module: ``best``/``export``,
``test``, ``predict``, ``status``, ``report``, and the worker deciding whether a finished trial's
checkpoint is kept.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from optuna.study import StudyDirection
    from optuna.trial import FrozenTrial

    from lightstudy.spec import StudySpec

    Direction = str | StudyDirection  # "maximize"/"minimize", as a spec says, or Optuna's enum

__all__ = ["best_first", "candidates", "has_value", "kept", "pareto_front", "ranked", "top_k", "would_keep"]


def has_value(trial: FrozenTrial) -> bool:
    """Whether the trial has a value for every objective that can be compared (not None, not NaN)."""
    values = trial.values
    return values is not None and all(v is not None and not math.isnan(v) for v in values)


def best_first(trials: Sequence[FrozenTrial], directions: Sequence[Direction]) -> list[FrozenTrial]:
    """The complete trials among ``trials``, best first (several objectives: the Pareto front)."""
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE]
    valued = [t for t in done if has_value(t)]
    if len(directions) > 1:
        return pareto_front(valued, directions)
    sign = -1.0 if _maximize(directions[0]) else 1.0
    ranked = sorted(valued, key=lambda t: (sign * float(t.values[0]), t.number))
    return ranked + sorted((t for t in done if not has_value(t)), key=lambda t: t.number)


def candidates(trials: Sequence[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
    """The trials that may rank: every one, or with a scheduler its lineages' furthest."""
    from lightstudy.scheduler import finals

    return finals(trials, spec.study.scheduler)


def ranked(trials: Sequence[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
    """:func:`best_first` over the study's :func:`candidates`: what ``best`` and the rest show."""
    return best_first(candidates(trials, spec), spec.study.directions)


def pareto_front(trials: Sequence[FrozenTrial], directions: Sequence[Direction]) -> list[FrozenTrial]:
    """The trials among ``trials`` that no other one dominates, by number.

    Computed by Optuna's ``Study.best_trials`` on an in-memory study holding only the trials'
    values, so the rule (ties, infinities) is Optuna's own.
    """
    import optuna
    from optuna.samplers import RandomSampler
    from optuna.storages import InMemoryStorage
    from optuna.study import StudyDirection

    valued = [t for t in trials if has_value(t)]
    if not valued:
        return []
    storage = InMemoryStorage()
    name = "lightstudy.ranking"
    quiet = logging.getLogger(InMemoryStorage.__module__)  # its INFO "A new study created in memory"
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        study_id = storage.create_new_study(
            [StudyDirection.MAXIMIZE if _maximize(d) else StudyDirection.MINIMIZE for d in directions],
            study_name=name,
        )
    finally:
        quiet.setLevel(level)
    for t in valued:  # only the values travel: params and attrs (configs) would be copied for nothing
        storage.create_new_trial(study_id, template_trial=_complete(0, t.values))
    front = optuna.Study(study_name=name, storage=storage, sampler=RandomSampler()).best_trials
    # The in-memory study numbers its trials 0, 1, ... in the order they were added.
    return sorted((valued[t.number] for t in front), key=lambda t: t.number)


def top_k(trials: Sequence[FrozenTrial], directions: Sequence[Direction], k: int) -> list[FrozenTrial]:
    """The best ``k`` complete trials (several objectives: the whole Pareto front; ``k = 0``: none)."""
    if k <= 0:
        return []
    ranked = best_first(trials, directions)
    return ranked if len(directions) > 1 else ranked[:k]


def kept(trials: Sequence[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
    """The trials whose checkpoints the study keeps, best first (several objectives: by number)."""
    return top_k(_with_checkpoint(candidates(trials, spec)), spec.study.directions, spec.study.checkpoints.keep)


def would_keep(trials: Sequence[FrozenTrial], spec: StudySpec, number: int, values: Sequence[float]) -> bool:
    """Whether trial ``number``, completing now with ``values``, enters the kept set.

    Ties go to the lower number, so a trial that ties the last kept one does not displace it.
    """
    candidate = _complete(number, values)
    if spec.study.scheduler is not None:  # it ranks among its level's trials, if it reached the highest
        own = next((t for t in trials if t.number == number), None)
        if own is not None:
            candidate.user_attrs = dict(own.user_attrs)
            candidate.intermediate_values = dict(own.intermediate_values)
        pool = candidates([*(t for t in trials if t.number != number), candidate], spec)
        if not any(t is candidate for t in pool):
            return False
        trials = [t for t in pool if t is not candidate]
    others = [t for t in _with_checkpoint(trials) if t.number != number]
    return any(t is candidate for t in top_k([*others, candidate], spec.study.directions, spec.study.checkpoints.keep))


def _complete(number: int, values: Sequence[float] | None) -> FrozenTrial:
    """A complete trial with only a number and values (not validated: a NaN ranks last here)."""
    from optuna.trial import FrozenTrial, TrialState

    now = datetime.datetime.now()
    return FrozenTrial(
        number=number,
        state=TrialState.COMPLETE,
        value=None,
        values=None if values is None else list(values),
        datetime_start=now,
        datetime_complete=now,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=number,
    )


def _with_checkpoint(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    from lightstudy.artifacts import CheckpointRef

    return [t for t in trials if t.state == TrialState.COMPLETE and CheckpointRef.of(t) is not None]


def _maximize(direction: Direction) -> bool:
    return str(getattr(direction, "name", direction)).lower() == "maximize"
