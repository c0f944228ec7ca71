"""The scheduler's decisions (ASHA with promotions, population-based training) as pure code.

A free worker, holding the study's claim lock, shows the scheduler a plain view of the study's
trials (:class:`TrialView`) and gets one :data:`Job`: :class:`Sample` a new configuration,
:class:`Promote` one to the next rung, :class:`Exploit` a better member's checkpoint with
explored parameters, :class:`Continue` a member with its own, :class:`Wait` for running trials,
or :class:`Done`. Nothing here trains, sleeps or touches a database; the same code drives the
workers and ``bench/schedulers.py``.

Decisions (the shape of issue 13):

- **A promotion, an exploit or a continuation is a new trial** that starts from its parent's
  checkpoint and trains on until ``epochs`` epochs in all. Its user attrs (:func:`attrs`)
  are ``parent_trial``, ``rung`` (ASHA) or ``generation`` (PBT), and ``lineage``. Steps are
  Lightning's epoch index (0-based), so a trial that reported step ``s`` has trained ``s + 1``
  epochs, and its child's first step is ``s + 1``.
- **Retries are the same job.** Optuna's ``RetryFailedTrialCallback`` copies user attrs, so a
  retried trial keeps its lineage and rung/generation; trials are therefore grouped by
  ``(lineage, rung)`` or ``(lineage, generation)``, never by number. A group holding only failed
  (or pruned) trials is dead: a failure that was not retried ends its configuration, so a
  configuration that always crashes is never promoted again and again.
- **A promotion is claimed as soon as its trial exists** (in any state), so two workers asking
  one after the other, each adding the trial of the job it got, never promote a configuration
  twice.
- **ASHA** (Li et al., 2020, promotion variant). Rung ``k`` trains ``min_resource * eta**k``
  epochs while below ``max_resource``; the top rung trains ``max_resource``. A configuration
  that completed rung ``k`` is promotable when it ranks in the top ``floor(n_k / eta)`` of the
  ``n_k`` configurations that completed rung ``k`` and has no trial at rung ``k + 1``. The best
  promotable configuration of the highest rung goes first; with none, a new configuration is
  sampled while fewer than ``n_trials`` were (promotions do not count; ``None``: no limit, the
  timeout ends the study). The study is done when nothing is promotable, the budget is spent
  and no trial is running: every configuration is then stopped or at ``max_resource``. A rung's
  score is the value reported at its last epoch (the trial's value when that step is missing).
- **PBT** (Jaderberg et al., 2017, asynchronous). A member is a lineage: its trials train
  ``interval`` epochs each (the last one up to ``max_resource``). The first ``population`` jobs
  sample the members. Then a free worker takes the member with the fewest epochs whose last
  trial completed, so members stay about one interval apart, and ranks every member by its
  latest score. A member in the bottom ``quantile`` exploits: it copies the checkpoint of a
  random member of the top ``quantile`` (one not behind it and not finished) and explores its
  parameters: each is drawn afresh from its Optuna distribution with ``resample_probability``,
  else a float or int is multiplied by 0.8 or 1.2 (rounded to its step, clipped to its bounds)
  and a categorical kept. Other members continue with their own parameters. ``parent_trial``
  is the trial whose checkpoint a trial starts from; ``lineage`` is the member it trains. The
  study is done when every member has trained ``max_resource`` epochs (or died). A member that
  copies one ahead of it skips those epochs, so no member trains more than ``max_resource``
  epochs and the study at most ``population * max_resource``.
- **Checkpoints** (:meth:`Asha.needed_checkpoints`, :meth:`Pbt.needed_checkpoints`): the parent
  of every unfinished trial; for ASHA, a completed rung trial that is not promoted but would
  rank in its rung's top ``1/eta`` if every configuration that may still reach the rung (not
  sampled yet, running it, or promotable into it) did worse (about ``n_trials / (eta - 1)`` at
  most; with no ``n_trials``, every unpromoted one); for PBT, each unfinished member's latest
  completed trial (at most ``population``). Top-k retention is kept on top of this.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from lightstudy.study_block import AshaSettings, PbtSettings

__all__ = [
    "Asha",
    "Continue",
    "Done",
    "Exploit",
    "Job",
    "Pbt",
    "Promote",
    "Sample",
    "TrialView",
    "Wait",
    "attrs",
    "claimed",
    "explore",
    "make_scheduler",
    "scheduler_of",
    "views",
]

UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)
PERTURB_FACTORS = (0.8, 1.2)  # PBT's explore: a float or int is multiplied by one of these


@dataclass(frozen=True)
class TrialView:
    """What the scheduler reads of one trial."""

    number: int
    state: TrialState
    params: Mapping[str, Any] = field(default_factory=dict)
    values: Mapping[int, float] = field(default_factory=dict)  # intermediate values: step (epoch index) -> value
    value: float | None = None  # the trial's reported value, when it completed
    parent: int | None = None  # user attr parent_trial
    rung: int | None = None  # user attr rung (ASHA)
    generation: int | None = None  # user attr generation (PBT)
    lineage_attr: int | None = None  # user attr lineage

    @property
    def lineage(self) -> int:
        return self.number if self.lineage_attr is None else self.lineage_attr

    @property
    def epochs(self) -> int:
        """Epochs trained so far, counted from its reports (step = 0-based epoch index)."""
        return max(self.values) + 1 if self.values else 0

    def score(self, epochs: int | None = None) -> float | None:
        """The value after ``epochs`` epochs (default: its last report), else the trial's value."""
        step = (epochs - 1) if epochs is not None else (max(self.values) if self.values else None)
        if step is not None and step in self.values:
            return self.values[step]
        return self.value

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialView:
        """The view of an Optuna trial (its user attrs as :func:`attrs` writes them)."""
        attrs = trial.user_attrs
        return cls(
            trial.number,
            trial.state,
            dict(trial.params),
            dict(trial.intermediate_values),
            trial.value if trial.state == TrialState.COMPLETE and trial.values and len(trial.values) == 1 else None,
            attrs.get("parent_trial"),
            attrs.get("rung"),
            attrs.get("generation"),
            attrs.get("lineage"),
        )


@dataclass(frozen=True)
class Sample:
    """Sample a new configuration and train it ``epochs`` epochs (rung 0, or generation 0)."""

    epochs: int
    rung: int | None = None
    generation: int | None = None


@dataclass(frozen=True)
class Promote:
    """Train configuration ``lineage`` on from trial ``parent``'s checkpoint until ``epochs`` in all."""

    parent: int
    lineage: int
    rung: int
    epochs: int
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Exploit:
    """Member ``lineage`` starts from trial ``parent``'s checkpoint (a better member) with explored params."""

    parent: int
    lineage: int
    generation: int
    epochs: int
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Continue:
    """Member ``lineage`` trains on from its own last trial ``parent`` with the same params."""

    parent: int
    lineage: int
    generation: int
    epochs: int
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Wait:
    """Nothing to start now; ask again when a running trial finishes."""


@dataclass(frozen=True)
class Done:
    """The study's schedule is complete."""


Job = Sample | Promote | Exploit | Continue | Wait | Done


def attrs(job: Sample | Promote | Exploit | Continue, number: int) -> dict[str, int]:
    """The user attrs of trial ``number``, created to carry out ``job``."""
    if isinstance(job, Sample):
        out = {"lineage": number}
        if job.rung is not None:
            out["rung"] = job.rung
        if job.generation is not None:
            out["generation"] = job.generation
        return out
    level = {"rung": job.rung} if isinstance(job, Promote) else {"generation": job.generation}
    return {"parent_trial": job.parent, "lineage": job.lineage, **level}


def claimed(job: Sample | Promote | Exploit | Continue, number: int, params: Mapping[str, Any]) -> TrialView:
    """The running trial ``number`` that carries out ``job`` (``params``: sampled ones for a Sample)."""
    a = attrs(job, number)
    return TrialView(
        number,
        TrialState.RUNNING,
        dict(params),
        parent=a.get("parent_trial"),
        rung=a.get("rung"),
        generation=a.get("generation"),
        lineage_attr=a["lineage"],
    )


def _group(trials: Iterable[TrialView], level: str) -> dict[tuple[int, int], list[TrialView]]:
    """Trials by (lineage, rung or generation); trials without that attr are not scheduled."""
    groups: dict[tuple[int, int], list[TrialView]] = {}
    for t in trials:
        at = getattr(t, level)
        if at is not None:
            groups.setdefault((t.lineage, at), []).append(t)
    return groups


def _status(group: Sequence[TrialView]) -> tuple[str, TrialView | None]:
    """``("busy", None)``, ``("complete", trial)`` or ``("dead", None)`` for the trials of one job."""
    done = [t for t in group if t.state == TrialState.COMPLETE]
    if done:
        return "complete", min(done, key=lambda t: t.number)
    if any(t.state in UNFINISHED for t in group):
        return "busy", None
    return "dead", None


def _ordered(direction: str, scored: list[tuple[float, TrialView]]) -> list[TrialView]:
    """Best first; ties go to the earlier trial."""
    sign = -1.0 if direction == "maximize" else 1.0
    return [t for _, t in sorted(scored, key=lambda st: (sign * st[0], st[1].number))]


class Asha:
    """Asynchronous successive halving with promotions. See the module docstring."""

    def __init__(
        self,
        *,
        max_resource: int,
        min_resource: int = 1,
        reduction_factor: int = 3,
        n_trials: int | None = None,
        direction: str = "maximize",
    ) -> None:
        self.eta = reduction_factor
        self.n_trials = n_trials
        self.direction = direction
        self.rungs: list[int] = []  # epochs in all at the end of each rung
        r = min_resource
        while r < max_resource:
            self.rungs.append(r)
            r *= reduction_factor
        self.rungs.append(max_resource)

    def _ladder(self, trials: Sequence[TrialView]) -> tuple[list[list[TrialView]], set[tuple[int, int]], int]:
        """Per rung, its completed trials best first; the (lineage, rung) pairs that exist; configurations.

        A trial without a finite score at its rung's epoch counts as the rung's worst.
        """
        groups = _group(trials, "rung")
        worst = -math.inf if self.direction == "maximize" else math.inf
        ranked: list[list[TrialView]] = []
        for k, epochs in enumerate(self.rungs):
            scored = []
            for (_, rung), group in groups.items():
                _, trial = _status(group)
                if rung == k and trial is not None:
                    s = trial.score(epochs)
                    scored.append((s if s is not None and math.isfinite(s) else worst, trial))
            ranked.append(_ordered(self.direction, scored))
        configurations = len({lineage for lineage, rung in groups if rung == 0})
        return ranked, set(groups), configurations

    def _promotable(self, t: TrialView, k: int, exists: set[tuple[int, int]]) -> bool:
        s = t.score(self.rungs[k])
        return (t.lineage, k + 1) not in exists and s is not None and math.isfinite(s)

    def next_job(self, trials: Sequence[TrialView]) -> Job:
        """Promote the best promotable configuration of the highest rung, else sample, else wait or end."""
        ranked, exists, configurations = self._ladder(trials)
        for k in reversed(range(len(self.rungs) - 1)):
            for t in ranked[k][: len(ranked[k]) // self.eta]:
                if self._promotable(t, k, exists):
                    return Promote(t.number, t.lineage, k + 1, self.rungs[k + 1], dict(t.params))
        if self.n_trials is None or configurations < self.n_trials:
            return Sample(self.rungs[0], rung=0)
        return Wait() if any(t.state in UNFINISHED for t in trials) else Done()

    def needed_checkpoints(self, trials: Sequence[TrialView]) -> set[int]:
        """Trials whose checkpoint a running trial starts from, or that a rung may still promote."""
        needed = {t.parent for t in trials if t.state in UNFINISHED and t.parent is not None}
        ranked, exists, configurations = self._ladder(trials)
        busy = [0] * len(self.rungs)
        for (_, rung), group in _group(trials, "rung").items():
            if rung < len(self.rungs):  # a rung of other settings is not scheduled
                busy[rung] += _status(group)[0] == "busy"
        # An upper bound on the configurations that may still complete rung k: the ones not
        # sampled yet, the ones running it, and every one that may still be promoted into it.
        arriving: float = math.inf if self.n_trials is None else max(0, self.n_trials - configurations)
        for k in range(len(self.rungs) - 1):
            arriving += busy[k]
            slots = len(ranked[k]) if math.isinf(arriving) else (len(ranked[k]) + int(arriving)) // self.eta
            candidates = [t for i, t in enumerate(ranked[k]) if i < slots and self._promotable(t, k, exists)]
            needed |= {t.number for t in candidates}
            arriving += len(candidates)
        return needed

    @classmethod
    def of(cls, settings: AshaSettings, *, n_trials: int | None, direction: str) -> Asha:
        return cls(
            max_resource=settings.max_resource,
            min_resource=settings.min_resource,
            reduction_factor=settings.reduction_factor,
            n_trials=n_trials,
            direction=direction,
        )


@dataclass(frozen=True)
class _Member:
    lineage: int
    generation: int  # of its latest trial
    status: str  # busy, complete, dead
    last: TrialView | None  # its latest completed trial


def explore(
    params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
    rng: random.Random,
    resample_probability: float,
) -> dict[str, Any]:
    """PBT's explore step on ``params``; every value stays inside its Optuna distribution."""
    out = dict(params)
    for name, value in params.items():
        dist = distributions.get(name)
        if dist is None:
            continue
        resample = rng.random() < resample_probability
        if isinstance(dist, CategoricalDistribution):
            out[name] = rng.choice(dist.choices) if resample else value
        elif isinstance(dist, (FloatDistribution, IntDistribution)):
            out[name] = _snap(dist, _draw(dist, rng) if resample else value * rng.choice(PERTURB_FACTORS))
    return out


def _draw(dist: FloatDistribution | IntDistribution, rng: random.Random) -> float:
    if dist.log:
        return math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
    return rng.uniform(dist.low, dist.high)


def _snap(dist: FloatDistribution | IntDistribution, value: float) -> Any:
    """``value`` onto ``dist``'s grid (its step from low) and inside its bounds."""
    value = min(max(value, dist.low), dist.high)
    step = dist.step if dist.step is not None else (1 if isinstance(dist, IntDistribution) else None)
    if step is not None:
        value = dist.low + round((value - dist.low) / step) * step
        while value > dist.high:
            value -= step
    if isinstance(dist, IntDistribution):
        return int(round(value))
    return float(value)


class Pbt:
    """Asynchronous population-based training. See the module docstring."""

    def __init__(
        self,
        *,
        population: int,
        interval: int,
        max_resource: int,
        distributions: Mapping[str, BaseDistribution],
        quantile: float = 0.25,
        resample_probability: float = 0.25,
        direction: str = "maximize",
        seed: int | None = 0,
    ) -> None:
        self.population = population
        self.interval = interval
        self.max_resource = max_resource
        self.distributions = dict(distributions)
        self.quantile = quantile
        self.resample_probability = resample_probability
        self.direction = direction
        self.seed = seed

    def _members(self, trials: Sequence[TrialView]) -> list[_Member]:
        latest: dict[int, tuple[int, list[TrialView]]] = {}
        completed: dict[int, TrialView] = {}
        for (lineage, gen), group in sorted(_group(trials, "generation").items()):
            latest[lineage] = (gen, group)
            status, trial = _status(group)
            if trial is not None:
                completed[lineage] = trial
        members = []
        for lineage, (gen, group) in latest.items():
            status, _ = _status(group)
            members.append(_Member(lineage, gen, status, completed.get(lineage) if status != "dead" else None))
        return members

    def _rng(self, lineage: int, generation: int) -> random.Random:
        """One stream per decision, so whichever worker makes it, it is the same."""
        return random.Random(f"{self.seed}:{lineage}:{generation}")

    def next_job(self, trials: Sequence[TrialView]) -> Job:
        """Sample the population, then exploit/explore or continue the member furthest behind."""
        members = self._members(trials)
        if len(members) < self.population:
            return Sample(min(self.interval, self.max_resource), generation=0)
        live = [m for m in members if m.status == "complete" and m.last is not None]
        free = [m for m in live if m.last is not None and m.last.epochs < self.max_resource]
        if not free:
            return Wait() if any(m.status == "busy" for m in members) else Done()
        member = min(free, key=lambda m: (m.last.epochs if m.last else 0, m.generation, m.lineage))
        assert member.last is not None
        scored = [(s, m.last) for m in members if m.last is not None and (s := m.last.score()) is not None]
        ranked = _ordered(self.direction, [(s, t) for s, t in scored if math.isfinite(s)])
        cut = max(1, int(len(ranked) * self.quantile)) if len(ranked) >= 2 else 0
        top, bottom = ranked[:cut], ranked[len(ranked) - cut :]
        epochs = member.last.epochs
        if member.last in bottom and member.last not in top:
            sources = [t for t in top if epochs <= t.epochs < self.max_resource]
            if sources:
                rng = self._rng(member.lineage, member.generation + 1)
                source = rng.choice(sources)
                params = explore(source.params, self.distributions, rng, self.resample_probability)
                end = min(source.epochs + self.interval, self.max_resource)
                return Exploit(source.number, member.lineage, member.generation + 1, end, params)
        end = min(epochs + self.interval, self.max_resource)
        return Continue(member.last.number, member.lineage, member.generation + 1, end, dict(member.last.params))

    def needed_checkpoints(self, trials: Sequence[TrialView]) -> set[int]:
        """Trials whose checkpoint a running trial starts from, or that a member may still continue or copy."""
        needed = {t.parent for t in trials if t.state in UNFINISHED and t.parent is not None}
        for m in self._members(trials):
            if m.last is not None and m.last.epochs < self.max_resource:
                needed.add(m.last.number)
        return needed

    @classmethod
    def of(
        cls, settings: PbtSettings, *, distributions: Mapping[str, BaseDistribution], direction: str, seed: int | None
    ) -> Pbt:
        return cls(
            population=settings.population,
            interval=settings.interval,
            max_resource=settings.max_resource,
            distributions=distributions,
            quantile=settings.quantile,
            resample_probability=settings.resample_probability,
            direction=direction,
            seed=seed,
        )


def make_scheduler(
    settings: AshaSettings | PbtSettings,
    *,
    n_trials: int | None,
    direction: str,
    distributions: Mapping[str, BaseDistribution],
    seed: int | None = 0,
) -> Asha | Pbt:
    """The scheduler a ``study.scheduler`` block names."""
    if settings.name == "ASHA":
        return Asha.of(settings, n_trials=n_trials, direction=direction)
    return Pbt.of(settings, distributions=distributions, direction=direction, seed=seed)


# --- what the workers and the result commands use (the classes above stay pure) -------------

EPOCHS_ATTR = "epochs"  # user attr: the epochs in all a scheduled trial trains until (its job's ``epochs``)


def views(trials: Iterable[FrozenTrial]) -> list[TrialView]:
    """The scheduler's view of a study's trials."""
    return [TrialView.of(t) for t in trials]


def scheduler_of(spec: Any) -> Asha | Pbt | None:
    """The scheduler of a :class:`lightstudy.spec.StudySpec` (None: it has none)."""
    settings = spec.study.scheduler
    if settings is None:
        return None
    return make_scheduler(
        settings,
        n_trials=spec.study.n_trials,
        direction=spec.study.direction,
        distributions={p.path: p.distribution() for p in spec.search_space},
        seed=spec.study.seed,
    )


def level(trial: FrozenTrial, settings: AshaSettings | PbtSettings) -> int | None:
    """How far a scheduled trial got: its rung (ASHA) or the epochs it trained (PBT); None: not scheduled."""
    attrs = trial.user_attrs
    if settings.name == "ASHA":
        rung = attrs.get("rung")
        return None if rung is None else int(rung)
    if attrs.get("generation") is None:
        return None
    return max(trial.intermediate_values) + 1 if trial.intermediate_values else 0


def finals(trials: Sequence[FrozenTrial], settings: AshaSettings | PbtSettings | None) -> list[FrozenTrial]:
    """The complete trials the results rank: those at the highest rung any complete trial reached
    (ASHA), or the members' trials with the most epochs trained (PBT: the final members once
    the population has trained ``max_resource`` epochs). Without a scheduler: ``trials``.

    The set only grows until a trial reaches a higher level, then it is replaced for good, so a
    trial outside the top k when it completes never enters it later (retention needs no lock).
    """
    if settings is None:
        return list(trials)
    done = [(lv, t) for t in trials if t.state == TrialState.COMPLETE and (lv := level(t, settings)) is not None]
    top = max((lv for lv, _ in done), default=None)
    return [t for lv, t in done if lv == top]
