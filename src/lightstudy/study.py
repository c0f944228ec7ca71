"""Studies in the database: create (idempotently, spec stored in user attrs), load, budget, claim."""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError, StudyNotFoundError
from lightstudy.spec import StudySpec, spec_from_dict
from lightstudy.storage import open_storage, redact, retry_db
from lightstudy.storage.boundary import ProxyClientStorage, storage_of, trial_id, wrap

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

__all__ = [
    "Budget",
    "best_params",
    "budget",
    "claim_trial",
    "count_budget",
    "create_study",
    "enqueue",
    "load_study",
    "retried_numbers",
    "tell",
]

SPEC_ATTR = "lightstudy.spec"
FINGERPRINT_ATTR = "lightstudy.fingerprint"
VERSION_ATTR = "lightstudy.version"
GRID_ATTR = "grid_id"  # the system attr in which GridSampler records a trial's point

_log = logging.getLogger(__name__)


def _study_names(storage: BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def create_study(spec: StudySpec, url: str, *, update_spec: bool = False) -> optuna.Study:
    """Create the study and store its spec; a second call with the same spec just loads it.

    Raises:
        LightstudyError: a study of that name exists with a different spec and ``update_spec``
            is false (the message lists what differs).
    """
    import optuna

    from lightstudy import __version__
    from lightstudy.components import build_pruner, build_sampler

    storage = open_storage(url)
    name = spec.study.name
    stored = spec.to_dict(with_storage=False)
    if name in _study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        old = study.user_attrs.get(SPEC_ATTR)
        if old is None:
            raise LightstudyError(
                f"study {name!r} in {redact(url)} was not created by lightstudy (it has no stored spec)",
                fix="choose another study.name",
            )
        if study.user_attrs.get(FINGERPRINT_ATTR) != spec.fingerprint():
            if not update_spec:
                changed = ", ".join(_differences(old, stored)) or "formatting"
                raise LightstudyError(
                    f"study {name!r} already exists in {redact(url)} with a different spec (changed: {changed})",
                    fix="pass --update-spec to replace the stored spec, or change study.name",
                )
            if [d.name.lower() for d in study.directions] != list(spec.study.directions):
                raise LightstudyError(
                    f"study {name!r}: directions cannot change once the study exists",
                    fix="change study.name to start a new study",
                )
            study.set_user_attr(SPEC_ATTR, stored)
            study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
            enqueue(study, spec, spec.study.enqueue)
            _log.info("updated the stored spec of study %s", name)
        return study
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))  # not "A new study created in RDB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # set_metric_names is experimental
            study = optuna.create_study(
                storage=storage,
                study_name=name,
                directions=[d for d in spec.study.directions],  # type: ignore[misc]
                sampler=build_sampler(spec),
                pruner=build_pruner(spec),
                load_if_exists=True,  # a worker elsewhere may create it at the same moment
            )
            study.set_metric_names(list(spec.study.metrics))
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.set_user_attr(SPEC_ATTR, stored)
    study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
    study.set_user_attr(VERSION_ATTR, __version__)
    enqueue(study, spec, spec.study.enqueue)
    return study


def enqueue(study: optuna.Study, spec: StudySpec, configurations: Sequence[Mapping[str, Any]]) -> int:
    """Queue parameter sets to be evaluated before any sampled trial; returns how many are new.

    A set already in the study (any state) is not queued again, so re-running ``create`` with the
    same spec adds nothing.

    Raises:
        SpecError: a path that is not in the search space, or a value outside its distribution.
    """
    from optuna.trial import TrialState

    from lightstudy.search_space import check_fixed_params

    for i, params in enumerate(configurations):
        check_fixed_params(spec.source, f"enqueue[{i}]", spec.search_space, params)
    before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for params in configurations:
            study.enqueue_trial(dict(params), skip_if_exists=True)
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) - before


def best_params(url: str, name: str, top: int) -> list[dict[str, Any]]:
    """Parameters of the best ``top`` complete trials of any Optuna study (for a warm start).

    Raises:
        StudyNotFoundError: no such study.
    """
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(url, create=False)
    if name not in _study_names(storage):
        raise StudyNotFoundError(
            f"no study {name!r} in {redact(url)} to start from",
            fix="check --from-study and --from-storage",
        )
    other = optuna.load_study(study_name=name, storage=storage)
    done = other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(other.directions) > 1:
        ranked = other.best_trials
    else:
        sign = -1.0 if other.direction.name == "MAXIMIZE" else 1.0
        ranked = sorted(done, key=lambda t: (sign * float(t.values[0]), t.number))
    return [dict(t.params) for t in ranked[:top]]


def load_study(url: str, name: str, *, storage: BaseStorage | None = None) -> tuple[optuna.Study, StudySpec]:
    """The study and its stored spec, with heartbeats set up from the spec.

    Raises:
        StudyNotFoundError: no such study (the message lists the ones there are).
    """
    import optuna

    from lightstudy.components import build_pruner

    storage = storage or open_storage(url, create=False)
    names = _study_names(storage)
    if name not in names:
        listed = ", ".join(sorted(names)) or "none"
        raise StudyNotFoundError(
            f"no study {name!r} in {redact(url)} (studies there: {listed})",
            fix="check the name, or create it with lightstudy create FILE",
        )
    study = optuna.load_study(study_name=name, storage=storage)
    doc = study.user_attrs.get(SPEC_ATTR)
    if doc is None:
        raise LightstudyError(
            f"study {name!r} in {redact(url)} was not created by lightstudy (it has no stored spec)",
            fix="create studies with lightstudy create FILE",
        )
    spec = spec_from_dict(doc, source=f"study {name!r}")
    settings = spec.study
    wrap(storage).configure(settings.heartbeat_interval, settings.grace_period, settings.max_retry)
    study.pruner = build_pruner(spec)
    return study, spec


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


@dataclass(frozen=True)
class Budget:
    """Where a study stands against its study-wide budget."""

    used: int  # trials that count: finished (not retried) + running + waiting
    running: int
    waiting: int
    timed_out: bool
    full: bool  # n_trials reached
    exhausted: bool = False  # a GridSampler study: every point of the grid has been started

    @property
    def may_claim(self) -> bool:
        """A worker may start a trial: a fresh one, or a waiting retry/enqueued one."""
        return not self.timed_out and (not (self.full or self.exhausted) or self.waiting > 0)

    @property
    def done(self) -> bool:
        """Nothing left to start and nothing running anywhere."""
        return not self.may_claim and self.running == 0


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a later trial retries (they do not eat the budget)."""
    return {t.system_attrs["retry_history"][-1] for t in trials if t.system_attrs.get("retry_history")}


def budget(trials: Sequence[FrozenTrial], spec: StudySpec, now: datetime.datetime | None = None) -> Budget:
    """Count the budget from the trials (so every worker, anywhere, counts the same)."""
    from optuna.trial import TrialState

    retried = retried_numbers(trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    # With a scheduler, n_trials counts configurations: a promotion or a PBT step is no new one.
    first = [t for t in trials if spec.study.scheduler is None or _new_configuration(t)]
    used = sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        or (t.state == TrialState.FAIL and t.number not in retried)
        for t in first
    )
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    grid = {t.system_attrs[GRID_ATTR] for t in trials if GRID_ATTR in t.system_attrs}
    return _budget(spec, used, running, waiting, min(starts, default=None), now, grid_started=len(grid))


def _new_configuration(trial: FrozenTrial) -> bool:
    """A scheduled trial that samples a configuration (rung 0 / generation 0), or one not marked yet."""
    attrs = trial.user_attrs
    return "parent_trial" not in attrs and not attrs.get("rung") and not attrs.get("generation")


def _budget(
    spec: StudySpec,
    used: int,
    running: int,
    waiting: int,
    first_start: datetime.datetime | None,
    now: datetime.datetime | None = None,
    *,
    grid_started: int = 0,
) -> Budget:
    """The study's rules (``n_trials``, ``timeout`` from the first trial's start, a GridSampler's
    grid: ``grid_started`` of its points have a trial) over the counts."""
    from lightstudy.components import grid_size

    timed_out = False
    if spec.study.timeout is not None and first_start is not None:
        timed_out = ((now or datetime.datetime.now()) - first_start).total_seconds() >= spec.study.timeout
    full = spec.study.n_trials is not None and used >= spec.study.n_trials
    points = grid_size(spec)
    exhausted = points is not None and grid_started >= points
    return Budget(used, running, waiting, timed_out, full, exhausted)


def count_budget(study: optuna.Study, spec: StudySpec) -> tuple[Budget, int]:
    """The budget as :func:`budget` counts it, and the number of trials, without reading them
    where the storage can count (a few aggregate queries in a database)."""
    counts = storage_of(study).counts(study, GRID_ATTR)
    used = counts.total - counts.failed_retried
    running, waiting = counts.states.get("RUNNING", 0), counts.states.get("WAITING", 0)
    state = _budget(spec, used, running, waiting, counts.first_start, grid_started=counts.grid_started)
    return state, counts.total


def claim_trial(study: optuna.Study, spec: StudySpec) -> tuple[optuna.Trial | None, Budget]:
    """Reap dead workers' trials, then ask for a trial if the budget allows; atomically.

    Returns the trial (its parameters sampled, its first heartbeat recorded) or None, and the
    budget as it stood.
    """
    store = storage_of(study)
    if spec.study.scheduler is not None and isinstance(store, ProxyClientStorage):
        # the proxy does not serialize claims: a promotion or a PBT step could start twice
        raise LightstudyError(
            f"study {spec.study.name!r} has a scheduler, and lightstudy proxy does not serialize its claims",
            fix="run the workers of a scheduled study with the database URL (--storage postgresql+psycopg://...)",
        )
    with store.claim_lock(spec.study.name):
        store.reap(study, spec.study.grace_period)
        state, offset = count_budget(study, spec)
        if spec.study.scheduler is not None:
            return _claim_scheduled(study, spec, state, offset)
        if not state.may_claim:
            return None, state
        trial = _ask(study, spec, offset)
        if trial is None:  # the proxy counted the budget spent meanwhile
            return None, count_budget(study, spec)[0]
        return trial, state


def _claim_scheduled(
    study: optuna.Study, spec: StudySpec, state: Budget, offset: int
) -> tuple[optuna.Trial | None, Budget]:
    """:func:`claim_trial` for a study with a ``scheduler:`` (under the claim lock).

    A WAITING trial goes first: a retry (Optuna's retry copies user attrs, so it stays its job) or
    a queued configuration (``enqueue:``), which becomes a new configuration (rung 0 /
    generation 0). Otherwise the scheduler's job decides: Sample asks the sampler for a new
    configuration; Promote/Exploit/Continue queue a trial with the job's parameters and user attrs
    and claim it at once (it is the only WAITING trial), so the next worker's view holds it and
    no configuration is promoted twice; Wait and Done claim nothing (``Budget.done`` says which).
    ``n_trials`` counts configurations (the scheduler's rule), ``timeout`` holds as always.
    """
    from optuna.trial import TrialState

    from lightstudy import scheduler as sched

    store = storage_of(study)
    plan = sched.scheduler_of(spec)
    assert plan is not None
    if state.timed_out:
        return None, state
    trials = store.trials(study)
    views = sched.views(trials)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    job: sched.Job
    if waiting:
        first = min(waiting, key=lambda t: t.number)  # Optuna's ask takes the oldest
        trial = _ask(study, spec, offset)
        if trial is not None and sched.EPOCHS_ATTR not in first.user_attrs:
            _mark(study, trial, _first_job(plan))  # a queued configuration: a new one
        return trial, state
    job = plan.next_job(views)
    running = sum(v.state == TrialState.RUNNING for v in views)
    if isinstance(job, (sched.Wait, sched.Done)):
        # Wait: others' trials decide what comes next (the worker polls); Done: the study is.
        return None, Budget(state.used, running if isinstance(job, sched.Wait) else 0, 0, False, True)
    if not isinstance(job, sched.Sample):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.enqueue_trial(
                dict(job.params),
                user_attrs={**sched.attrs(job, -1), sched.EPOCHS_ATTR: job.epochs},
                skip_if_exists=False,
            )
    trial = _ask(study, spec, offset)
    if trial is not None and isinstance(job, sched.Sample):
        _mark(study, trial, job)
    return trial, state


def _first_job(plan: Any) -> Any:
    from lightstudy import scheduler as sched

    if isinstance(plan, sched.Asha):
        return sched.Sample(plan.rungs[0], rung=0)
    return sched.Sample(min(plan.interval, plan.max_resource), generation=0)


def _mark(study: optuna.Study, trial: optuna.Trial, job: Any) -> None:
    """The user attrs of a new configuration's trial (its lineage is its own number)."""
    from lightstudy import scheduler as sched

    attrs = {**sched.attrs(job, trial.number), sched.EPOCHS_ATTR: job.epochs}
    storage_of(study).set_trial_attrs(trial_id(trial), attrs)


def _ask(study: optuna.Study, spec: StudySpec, offset: int) -> optuna.Trial | None:
    """Ask for a trial (the oldest WAITING one, else a sampled one), its heartbeat and parameters
    recorded; None: the proxy counted the budget spent."""
    from lightstudy.components import build_sampler
    from lightstudy.search_space import suggest_params

    store = storage_of(study)
    if not store.serializes_claims:  # claims elsewhere may sample at once: their own streams
        offset += 7919 * (os.getpid() % 100003)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.sampler = build_sampler(spec, seed_offset=offset)
        try:
            trial = store.ask(study)
        except Exception as e:
            if store.budget_spent(e):
                return None
            raise
        try:
            store.beat(trial_id(trial))
            suggest_params(trial, spec.search_space)
        except Exception:
            _abandon(study, trial, spec.study.max_retry)
            raise
    return trial


def tell(study: optuna.Study, trial: optuna.Trial, values: list[float] | None, state: Any) -> None:
    """:meth:`lightstudy.storage.boundary.StudyStorage.tell` (a sampler's ``study.stop()`` is a
    no-op; a database restart is ridden out)."""
    storage_of(study).tell(study, trial, values, state)


def _abandon(study: optuna.Study, trial: optuna.Trial, max_retry: int | None) -> None:
    from optuna.trial import TrialState

    store = storage_of(study)

    def fail_and_retry() -> None:
        trial.set_user_attr("fail_reason", "the claim was interrupted by a database error; retried")
        tell(study, trial, None, TrialState.FAIL)
        store.requeue(study, store.trial(trial_id(trial)), max_retry)

    try:
        retry_db(fail_and_retry, what="hand back an interrupted claim")
    except Exception as e:  # the reaper of unbeaten trials gets it later
        _log.warning("could not hand back trial %d: %s", trial.number, e)


def reap_unbeaten(study: optuna.Study, spec: StudySpec, now: datetime.datetime | None = None) -> int:
    """Fail and retry RUNNING trials that never recorded a heartbeat and started more than the
    grace period before ``now`` (see :meth:`lightstudy.storage.boundary.DatabaseStorage.reap`)."""
    return storage_of(study).reap_unbeaten(study, spec.study.grace_period, now)
