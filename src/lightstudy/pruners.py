"""Optuna's median and percentile pruners, with the finished trials' values kept between checks.

Optuna's :class:`~optuna.pruners.PercentilePruner` (and :class:`~optuna.pruners.MedianPruner`)
reads every complete trial of the study on every ``should_prune`` and computes the percentile
over all of them, so one check costs time in proportion to the study's size: tens of
milliseconds per epoch at 10,000 trials. A complete trial never changes its intermediate values,
so these pruners keep, per step, the sorted values of the complete trials they have seen, and
on each check read only the trials that finished since (an indexed query on the trial id, as
Optuna's own cached storage does), then take the percentile from the sorted values in
logarithmic time. The decisions are Optuna's, bit for bit: the same trials count (complete ones,
a retry being its own trial), and the percentile is interpolated exactly as ``numpy.nanpercentile``
does.

A pruner keeps one cache per study and storage, so a long-lived worker that asks for many trials
of one study, or any trial of it, shares the cache.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from lightstudy.storage.boundary import storage_of, study_id

if TYPE_CHECKING:
    from collections.abc import Iterable

    from optuna.trial import FrozenTrial

    from lightstudy.storage.boundary import StudyStorage

__all__ = ["CachedMedianPruner", "CachedPercentilePruner", "cached_equivalent", "nan_percentile"]

RESYNC_SECONDS = 60.0  # how often the cache re-lists the ids of all complete trials (see _Cache.refresh)

_log = logging.getLogger(__name__)


def nan_percentile(ordered: list[float], percentile: float) -> float:
    """``numpy.nanpercentile(values, percentile)`` for the NaN-free ``ordered`` (ascending) values.

    Same "linear" interpolation, same floating-point operations, so the same bits; NaN when empty.
    """
    n = len(ordered)
    if n == 0:
        return math.nan
    index = (n - 1) * (percentile / 100)
    if index >= n - 1:  # numpy takes the last element for both neighbours (and its own lerp)
        below = above = ordered[-1]
        gamma = index - (-1)
    else:
        lower = math.floor(index)
        below, above = ordered[lower], ordered[lower + 1]
        gamma = index - lower
    diff = above - below
    if gamma >= 0.5:
        return above - diff * (1 - gamma)
    return below + diff * gamma


def best_intermediate(trial: FrozenTrial, direction: StudyDirection) -> float:
    """The trial's best intermediate value (NaN-ignoring; NaN when all are), as Optuna's
    percentile pruner takes it."""
    values = [float(v) for v in trial.intermediate_values.values()]
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return max(finite) if direction == StudyDirection.MAXIMIZE else min(finite)


def first_in_interval(step: int, steps: Iterable[int], n_warmup_steps: int, interval_steps: int) -> bool:
    """Whether ``step`` is the first reported step of its pruning interval (Optuna's rule)."""
    nearest_lower = (step - n_warmup_steps) // interval_steps * interval_steps + n_warmup_steps
    second_last = max((s for s in steps if s != step), default=-1)
    return second_last < nearest_lower


class _Cache:
    """Per-step intermediate values of one study's complete trials, read incrementally."""

    def __init__(self, storage: StudyStorage, study_id: int) -> None:
        self.storage = storage
        self.study_id = study_id
        self.complete: set[int] = set()  # trial ids counted
        self.unfinished: set[int] = set()  # ids at or below the watermark still running or waiting
        self.watermark = -1  # the highest id of a finished trial seen (as Optuna's cached storage)
        self.counts: dict[int, int] = {}  # step -> complete trials that reported it (NaN included)
        self.values: dict[int, list[float]] = {}  # step -> their non-NaN values, ascending
        self.resynced = -math.inf
        self.lock = threading.Lock()

    def add(self, intermediate: Mapping[int, float]) -> None:
        for step, value in intermediate.items():
            self.counts[step] = self.counts.get(step, 0) + 1
            if not math.isnan(value):
                bisect.insort(self.values.setdefault(step, []), value)

    def refresh(self, study: optuna.Study) -> None:
        """Take in the trials completed since the last call."""
        if not self.storage.reads_incrementally:
            self._refresh_generic(study)
            return
        db: Any = self.storage  # a DatabaseStorage
        new = []
        for trial_id, state in db.trial_states(self.study_id, above=self.watermark, among=self.unfinished):
            if state == TrialState.COMPLETE and trial_id not in self.complete:
                new.append(trial_id)
            if state.is_finished():
                self.unfinished.discard(trial_id)
                self.watermark = max(self.watermark, trial_id)
            else:
                self.unfinished.add(trial_id)
        # Ids are not always committed in order (PostgreSQL sequences): a trial created while a
        # higher id was already read would be missed, as by Optuna's cached storage. A periodic
        # re-listing of the complete ids heals that.
        now = time.monotonic()
        if now - self.resynced >= RESYNC_SECONDS:
            missed = db.complete_ids(self.study_id) - self.complete - set(new)
            if missed and self.resynced > -math.inf:
                _log.debug("study %d: %d complete trial(s) found by re-listing", self.study_id, len(missed))
            new += sorted(missed)
            self.resynced = now
        if new:
            for trial_id, intermediate in db.intermediate_values(new).items():
                self.add(intermediate)
                self.complete.add(trial_id)

    def _refresh_generic(self, study: optuna.Study) -> None:
        """Other storages (in-memory, journal, the gRPC proxy): list the complete trials, which
        those keep in memory, and take in only the ones not seen yet."""
        for trial_id, intermediate in self.storage.complete_intermediate_values(study).items():
            if trial_id not in self.complete:
                self.add(intermediate)
                self.complete.add(trial_id)


class CachedPercentilePruner(optuna.pruners.PercentilePruner):
    """:class:`optuna.pruners.PercentilePruner` with the same arguments and decisions, whose
    checks cost the same at 10 or 10,000 trials (see the module docstring)."""

    # It reads only through lightstudy's storage boundary and writes nothing: an epoch's report
    # and its pruning check can share one transaction (DatabaseStorage.report_and_prune).
    reads_through_boundary = True

    def __init__(
        self,
        percentile: float,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        interval_steps: int = 1,
        *,
        n_min_trials: int = 1,
    ) -> None:
        # Not super(): in CachedMedianPruner's MRO that is MedianPruner, which has no `percentile`.
        optuna.pruners.PercentilePruner.__init__(
            self, percentile, n_startup_trials, n_warmup_steps, interval_steps, n_min_trials=n_min_trials
        )
        self._caches: dict[tuple[int, int], _Cache] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_caches"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _cache(self, study: optuna.Study) -> _Cache:
        storage = storage_of(study)
        key = (id(storage.optuna), study_id(study))
        with self._lock:
            cache = self._caches.get(key)
            if cache is None:  # (it holds the storage: the id in its key is never reused)
                cache = self._caches[key] = _Cache(storage, study_id(study))
            return cache

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        # The order of the checks is Optuna's, so that the same calls fail in the same way (a
        # multi-objective study fails at `study.direction`).
        cache = self._cache(study)
        with cache.lock:
            cache.refresh(study)
            n_trials = len(cache.complete)
            if n_trials == 0 or n_trials < self._n_startup_trials:
                return False
            step = trial.last_step
            if step is None or step < self._n_warmup_steps:
                return False
            if not first_in_interval(
                step, trial.intermediate_values.keys(), self._n_warmup_steps, self._interval_steps
            ):
                return False
            direction = study.direction
            best = best_intermediate(trial, direction)
            if math.isnan(best):
                return True
            if cache.counts.get(step, 0) < self._n_min_trials:
                return False
            percentile = 100 - self._percentile if direction == StudyDirection.MAXIMIZE else self._percentile
            p = nan_percentile(cache.values.get(step, []), percentile)
            if math.isnan(p):
                return False
            if direction == StudyDirection.MAXIMIZE:
                return bool(best < p)
            return bool(best > p)


class CachedMedianPruner(CachedPercentilePruner, optuna.pruners.MedianPruner):
    """:class:`optuna.pruners.MedianPruner` with the same arguments and decisions, whose checks
    cost the same at 10 or 10,000 trials (see the module docstring)."""

    def __init__(
        self,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        interval_steps: int = 1,
        *,
        n_min_trials: int = 1,
    ) -> None:
        CachedPercentilePruner.__init__(
            self, 50.0, n_startup_trials, n_warmup_steps, interval_steps, n_min_trials=n_min_trials
        )


CACHED: dict[type, type] = {
    optuna.pruners.MedianPruner: CachedMedianPruner,
    optuna.pruners.PercentilePruner: CachedPercentilePruner,
}


def cached_equivalent(cls: type) -> type:
    """The cached pruner with the decisions of Optuna's ``cls``; ``cls`` itself for any other class."""
    return CACHED.get(cls, cls)


def spec_name(cls: type) -> str:
    """The name a spec gives ``cls``: Optuna's for a cached equivalent (what the user wrote)."""
    return next((optuna_cls.__name__ for optuna_cls, cached in CACHED.items() if cached is cls), cls.__name__)
