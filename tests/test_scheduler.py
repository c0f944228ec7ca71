"""The scheduler's decisions on hand-made views of a study: no training, no database."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from lightstudy.scheduler import (
    Asha,
    Continue,
    Done,
    Exploit,
    Pbt,
    Promote,
    Sample,
    TrialView,
    Wait,
    attrs,
    claimed,
    explore,
    make_scheduler,
)
from lightstudy.study_block import AshaSettings, PbtSettings

Scheduler = Asha | Pbt


class Study:
    """The trials a scheduler sees, grown as workers would: claim a job, then finish its trial."""

    def __init__(self) -> None:
        self.trials: list[TrialView] = []
        self.end: dict[int, int] = {}  # trial number -> the epochs its job trains up to

    def claim(self, job: Any, params: dict[str, Any] | None = None) -> TrialView:
        trial = claimed(job, len(self.trials), (params or {}) if isinstance(job, Sample) else job.params)
        self.trials.append(trial)
        return trial

    def finish(self, number: int, curve: Callable[[int], float], state: TrialState = TrialState.COMPLETE) -> None:
        """Trial ``number`` reports ``curve(epoch)`` from its parent's epochs up to its job's epochs."""
        t = self.trials[number]
        start = self.trials[t.parent].epochs if t.parent is not None else 0
        values = {} if state == TrialState.FAIL else {e - 1: curve(e) for e in range(start + 1, self.end[number] + 1)}
        last = values[max(values)] if values else None
        self.trials[number] = dataclasses.replace(t, state=state, values=values, value=last)


def drive(
    scheduler: Scheduler,
    quality: Callable[[dict[str, Any], int], float],
    sample: Callable[[random.Random], dict[str, Any]],
    workers: int = 3,
    seed: int = 0,
) -> tuple[Study, list[Any]]:
    """Run a study to Done with ``workers`` that finish their trials in a random order."""
    rng = random.Random(seed)
    study = Study()
    running: list[int] = []
    jobs: list[Any] = []
    for _ in range(10_000):
        while len(running) < workers:
            job = scheduler.next_job(study.trials)
            if isinstance(job, (Wait, Done)):
                break
            jobs.append(job)
            trial = study.claim(job, sample(rng))
            study.end[trial.number] = job.epochs
            running.append(trial.number)
        if not running:
            assert isinstance(scheduler.next_job(study.trials), Done)
            return study, jobs
        number = running.pop(rng.randrange(len(running)))
        params = study.trials[number].params
        study.finish(number, lambda e, p=params: quality(p, e))  # type: ignore[misc]
    raise AssertionError("the study never ended")


def _lr_quality(params: dict[str, Any], epoch: int) -> float:
    """Higher lr learns faster and ends higher: a ranking that epochs do not reverse."""
    return params["lr"] * (1 - 0.5**epoch)


def _lr(rng: random.Random) -> dict[str, Any]:
    return {"lr": rng.uniform(0.1, 1.0)}


def done(number: int, epochs: int, value: float, **kw: Any) -> TrialView:
    """A completed trial that reported ``value`` at its last epoch."""
    return TrialView(number, TrialState.COMPLETE, {"x": number}, {epochs - 1: value}, value, **kw)


def test_rungs_from_min_max_and_reduction_factor() -> None:
    assert Asha(max_resource=12, min_resource=1, reduction_factor=3).rungs == [1, 3, 9, 12]
    assert Asha(max_resource=9, min_resource=1, reduction_factor=3).rungs == [1, 3, 9]
    assert Asha(max_resource=20, min_resource=2, reduction_factor=2).rungs == [2, 4, 8, 16, 20]
    assert Asha(max_resource=5, min_resource=5).rungs == [5]


def test_promotes_the_best_of_the_top_third_of_a_rung_and_never_twice() -> None:
    asha = Asha(max_resource=9, n_trials=10)
    # Six configurations completed rung 0 (1 epoch): the top 6 // 3 = 2 (values 0.9, 0.8) are promotable.
    trials = [done(i, 1, v, rung=0) for i, v in enumerate([0.1, 0.8, 0.3, 0.9, 0.2, 0.5])]
    first = asha.next_job(trials)
    assert first == Promote(parent=3, lineage=3, rung=1, epochs=3, params={"x": 3})
    trials.append(claimed(first, 6, first.params))
    second = asha.next_job(trials)
    assert second == Promote(parent=1, lineage=1, rung=1, epochs=3, params={"x": 1})
    trials.append(claimed(second, 7, second.params))
    # Both promotions are claimed: the next job is a new configuration, not either of them again.
    assert asha.next_job(trials) == Sample(epochs=1, rung=0)
    assert attrs(second, 7) == {"parent_trial": 1, "lineage": 1, "rung": 1}
    assert attrs(Sample(1, rung=0), 8) == {"lineage": 8, "rung": 0}


def test_a_higher_rung_promotes_first_and_minimize_ranks_low_values_first() -> None:
    asha = Asha(max_resource=9, n_trials=3, direction="minimize")
    trials = [done(i, 1, v, rung=0) for i, v in enumerate([0.5, 0.1, 0.9])]
    trials += [done(3, 3, 0.05, rung=1, parent=1, lineage_attr=1)]
    trials += [done(i, 3, v, rung=1, parent=i - 10, lineage_attr=i - 10) for i, v in ((10, 0.2), (12, 0.7))]
    # Rung 1: lineages 1, 0, 2 with 0.05, 0.2, 0.7; its top one (lineage 1) goes to rung 2 before rung 0 is looked at.
    assert asha.next_job(trials) == Promote(parent=3, lineage=1, rung=2, epochs=9, params={"x": 3})


def test_a_rung_is_ranked_on_the_value_at_its_epoch_and_non_finite_values_never_promote() -> None:
    asha = Asha(max_resource=9, n_trials=3)
    late_bloomer = TrialView(0, TrialState.COMPLETE, {}, {0: 0.1, 1: 0.99}, 0.99, rung=0)  # reported past rung 0
    trials = [late_bloomer, done(1, 1, 0.5, rung=0), done(2, 1, float("nan"), rung=0)]
    job = asha.next_job(trials)
    assert isinstance(job, Promote) and job.parent == 1


def test_a_retried_trial_keeps_its_configuration_and_a_dead_one_is_stopped() -> None:
    asha = Asha(max_resource=3, n_trials=4)
    failed = TrialView(0, TrialState.FAIL, {"x": 0}, rung=0, lineage_attr=0)
    retry = TrialView(1, TrialState.RUNNING, {"x": 0}, rung=0, lineage_attr=0)  # RetryFailedTrialCallback copy
    trials = [failed, retry, done(2, 1, 0.1, rung=0), done(3, 1, 0.2, rung=0), done(4, 1, 0.15, rung=0)]
    # Lineage 0 is one configuration (not two): 4 sampled spend the budget; 3 completed, 3 // 3 = 1 promotes.
    assert asha.next_job(trials) == Promote(3, 3, 1, 3, {"x": 3})
    trials.append(claimed(Promote(3, 3, 1, 3, {"x": 3}), 5, {"x": 3}))
    assert asha.next_job(trials) == Wait()  # the retry and the promotion are running
    trials[1] = dataclasses.replace(retry, state=TrialState.FAIL)
    trials[5] = done(5, 3, 0.3, rung=1, parent=3, lineage_attr=3)
    # Lineage 0 died twice, nothing else is promotable: the study is done without sampling a fifth.
    assert asha.next_job(trials) == Done()


@pytest.mark.parametrize("n_trials", [1, 7, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_asha_budget_is_new_configurations_only_and_never_overshot(n_trials: int, seed: int) -> None:
    asha = Asha(max_resource=12, min_resource=1, reduction_factor=3, n_trials=n_trials)
    study, jobs = drive(asha, _lr_quality, _lr, workers=4, seed=seed)
    samples = [j for j in jobs if isinstance(j, Sample)]
    assert len(samples) == n_trials
    promotions = [j for j in jobs if isinstance(j, Promote)]
    # No configuration is promoted twice into one rung, and each promotion continues its parent's steps.
    assert len({(p.lineage, p.rung) for p in promotions}) == len(promotions)
    for t in study.trials:
        assert t.epochs <= 12 and t.state == TrialState.COMPLETE
        if t.parent is not None:
            parent = study.trials[t.parent]
            assert min(t.values) == max(parent.values) + 1 and t.lineage == parent.lineage
            assert t.rung == parent.rung + 1  # type: ignore[operator]
    # Done means nothing is promotable: each rung's final top third is promoted (asynchronous ASHA promoted
    # more than those: a configuration in the top third of the few that had reached the rung then).
    by_rung: dict[int, list[TrialView]] = {}
    for t in study.trials:
        by_rung.setdefault(t.rung or 0, []).append(t)
    for k, rung in by_rung.items():
        if k + 1 < len(asha.rungs):
            promoted = sorted(
                (t for t in rung if any(c.parent == t.number for c in study.trials)), key=lambda t: t.number
            )
            best = sorted(rung, key=lambda t: -(t.value or 0))[: len(rung) // 3]
            assert {t.number for t in best} <= {t.number for t in promoted}
    assert asha.needed_checkpoints(study.trials) == set()


def test_asha_finds_the_best_configuration_in_fewer_epochs_than_training_every_one() -> None:
    asha = Asha(max_resource=27, min_resource=1, reduction_factor=3, n_trials=27)
    study, _ = drive(asha, _lr_quality, _lr, workers=4)
    best_lr = max(t.params["lr"] for t in study.trials)
    at_top = [t for t in study.trials if t.rung == 3]
    assert at_top and max(t.params["lr"] for t in at_top) == best_lr  # the ranking holds from epoch 1 on
    assert (
        sum(t.epochs - (study.trials[t.parent].epochs if t.parent is not None else 0) for t in study.trials)
        < 27 * 27 / 3
    )


def test_needed_checkpoints_are_those_a_rung_may_still_promote_or_a_trial_starts_from() -> None:
    asha = Asha(max_resource=9, n_trials=6)
    trials = [done(i, 1, v, rung=0) for i, v in enumerate([0.1, 0.8, 0.3])]
    # 3 of 6 sampled: with 3 more to come, (3 + 3) // 3 = 2 slots: the best two may still be promoted.
    assert asha.needed_checkpoints(trials) == {1, 2}
    job = asha.next_job(trials)
    assert job == Promote(1, 1, 1, 3, {"x": 1})
    trials.append(claimed(job, 3, {"x": 1}))
    # Trial 1 is promoted, but its running child starts from it; trial 2 may still be.
    assert asha.needed_checkpoints(trials) == {1, 2}
    trials += [done(4, 1, 0.9, rung=0), done(5, 1, 0.95, rung=0), done(6, 1, 0.05, rung=0)]
    trials[3] = done(3, 3, 0.9, rung=1, parent=1, lineage_attr=1)
    # Rung 0 is full (6 of 6): its top 2 are 5 and 4 (promotable now), so 0, 2 and 6 can never be promoted,
    # nor is 1 needed (promoted, its child done). Rung 1 holds 3, and 4 and 5 may still join it: (1 + 2) // 3 = 1
    # slot, so 3 may still be promoted (should both do worse).
    assert asha.needed_checkpoints(trials) == {3, 4, 5}
    # With only a timeout, any configuration may still be needed (more may come): all unpromoted ones are kept.
    assert Asha(max_resource=9, n_trials=None).needed_checkpoints(trials) == {0, 2, 3, 4, 5, 6}


SPACE = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "dropout": FloatDistribution(0.0, 0.5, step=0.1),
    "units": IntDistribution(16, 64, step=16),
    "layers": IntDistribution(1, 5),
    "act": CategoricalDistribution(["relu", "tanh"]),
}


def test_explore_perturbs_by_the_factors_and_stays_inside_every_distribution() -> None:
    params = {"lr": 0.01, "dropout": 0.3, "units": 32, "layers": 3, "act": "relu"}
    kept = explore(params, SPACE, random.Random(0), resample_probability=0.0)
    assert kept["act"] == "relu" and kept["lr"] in (pytest.approx(0.008), pytest.approx(0.012))
    assert kept["layers"] in (2, 4) and kept["units"] in (32, 48)  # 25.6 -> 32, 38.4 -> 32; 3*1.2 = 3.6 -> 4
    for seed in range(200):
        for p in (0.0, 0.5, 1.0):
            out = explore({**params, "lr": 0.099, "dropout": 0.5, "units": 64}, SPACE, random.Random(seed), p)
            for name, dist in SPACE.items():
                assert dist._contains(dist.to_internal_repr(out[name])), (name, out[name])
            assert isinstance(out["units"], int) and isinstance(out["lr"], float)
    drawn = {explore(params, SPACE, random.Random(s), 1.0)["act"] for s in range(50)}
    assert drawn == {"relu", "tanh"}  # resampling draws every choice


def _pbt(**kw: Any) -> Pbt:
    return Pbt(population=4, interval=2, max_resource=8, distributions={"lr": FloatDistribution(0.1, 1.0)}, **kw)


def test_pbt_samples_the_population_then_the_bottom_copies_the_top() -> None:
    pbt = _pbt(quantile=0.25, resample_probability=0.0)
    trials: list[TrialView] = []
    for i in range(4):
        job = pbt.next_job(trials)
        assert job == Sample(2, generation=0)
        trials.append(claimed(job, i, {"lr": 0.2 + 0.2 * i}))
    assert pbt.next_job(trials) == Wait()  # a full population, all training
    trials = [dataclasses.replace(t, state=TrialState.COMPLETE, values={1: t.params["lr"]}) for t in trials]
    # Member 0 (lowest lr, worst) is furthest behind with the lowest number: it exploits member 3, the best.
    job = pbt.next_job(trials)
    assert isinstance(job, Exploit) and job.parent == 3 and job.lineage == 0 and job.generation == 1
    assert job.epochs == 4 and job.params["lr"] in (pytest.approx(0.8 * 0.8), pytest.approx(0.8 * 1.2))
    assert attrs(job, 4) == {"parent_trial": 3, "lineage": 0, "generation": 1}
    trials.append(claimed(job, 4, job.params))
    # Member 1 is not in the bottom quarter: it continues with its own checkpoint and parameters.
    assert pbt.next_job(trials) == Continue(1, 1, 1, 4, {"lr": pytest.approx(0.4)})
    # The same decision comes out whichever worker makes it.
    assert _pbt(quantile=0.25, resample_probability=0.0).next_job(trials[:4]) == Exploit(
        job.parent, job.lineage, job.generation, job.epochs, job.params
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pbt_ends_when_every_member_has_trained_max_resource_epochs_and_never_more(seed: int) -> None:
    pbt = Pbt(population=5, interval=3, max_resource=10, distributions={"lr": FloatDistribution(0.1, 1.0)}, seed=seed)
    study, jobs = drive(pbt, _lr_quality, _lr, workers=3, seed=seed)
    assert sum(isinstance(j, Sample) for j in jobs) == 5
    assert any(isinstance(j, Exploit) for j in jobs) and any(isinstance(j, Continue) for j in jobs)
    final: dict[int, TrialView] = {}
    for t in study.trials:
        assert t.epochs <= 10 and 1 <= t.epochs - (study.trials[t.parent].epochs if t.parent is not None else 0) <= 3
        if t.parent is not None:
            assert min(t.values) == max(study.trials[t.parent].values) + 1  # steps continue the parent's
            assert FloatDistribution(0.1, 1.0)._contains(t.params["lr"])
        final[t.lineage] = t
    assert len(final) == 5 and all(t.epochs == 10 for t in final.values())
    trained = sum(t.epochs - (study.trials[t.parent].epochs if t.parent is not None else 0) for t in study.trials)
    assert trained <= 5 * 10
    assert pbt.needed_checkpoints(study.trials) == set()


def test_pbt_needed_checkpoints_and_a_dead_member() -> None:
    pbt = _pbt()
    trials = [done(i, 2, 0.1 * (i + 1), generation=0) for i in range(4)]
    assert pbt.needed_checkpoints(trials) == {0, 1, 2, 3}
    job = pbt.next_job(trials)
    assert isinstance(job, Exploit) and job.parent == 3
    trials.append(claimed(job, 4, job.params))
    assert pbt.needed_checkpoints(trials) == {0, 1, 2, 3}  # 3 is also the parent of the running trial
    trials[4] = TrialView(4, TrialState.FAIL, job.params, parent=3, generation=1, lineage_attr=0)
    # Member 0's generation 1 failed without a retry: it is dead; the others still train.
    assert pbt.needed_checkpoints(trials) == {1, 2, 3}
    assert isinstance(pbt.next_job(trials), (Exploit, Continue))
    assert [t for t in trials if t.lineage == 0][-1].state == TrialState.FAIL


def test_pbt_is_done_with_every_member_at_max_resource_and_waits_before() -> None:
    pbt = _pbt()
    trials = [done(i, 8, 0.5, generation=3, lineage_attr=i) for i in range(4)]
    assert pbt.next_job(trials) == Done() and pbt.needed_checkpoints(trials) == set()
    trials[0] = dataclasses.replace(trials[0], state=TrialState.RUNNING, values={})
    assert pbt.next_job(trials) == Wait()


def test_make_scheduler_from_the_study_block() -> None:
    asha = make_scheduler(
        AshaSettings(name="ASHA", max_resource=12), n_trials=5, direction="minimize", distributions={}
    )
    assert isinstance(asha, Asha) and asha.rungs == [1, 3, 9, 12] and asha.n_trials == 5
    pbt = make_scheduler(
        PbtSettings(name="PBT", max_resource=6, population=3), n_trials=None, direction="maximize", distributions=SPACE
    )
    assert isinstance(pbt, Pbt) and pbt.population == 3 and pbt.distributions == SPACE


def test_a_rung_beyond_the_ladder_is_ignored_not_a_crash() -> None:
    """A trial recorded under other settings (a rung this ladder does not have) is not scheduled."""
    asha = Asha(max_resource=3, n_trials=1)
    trials = [done(0, 1, 0.5, rung=0), TrialView(1, TrialState.RUNNING, {"x": 0}, rung=7, parent=0, lineage_attr=0)]
    assert asha.needed_checkpoints(trials) == {0}  # the running trial's parent, nothing else
    assert asha.next_job(trials) == Wait()
