"""bench/chaos.py --quick, shortened to 30 s of chaos with 2 workers: kills and a database restart
cost no trial, no checkpoint and no resumption, and the script's checks do fail on what they guard
against."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState, create_trial

from conftest import REPO, run_bench

sys.path.insert(0, str(REPO / "bench"))
import chaos

KEYS = ["finished", "n_trials", "running", "duplicates", "lost", "orphans", "kept_checkpoints", "keep"]
KEYS += ["resumed_ok", "retried", "kills", "db_restarts"]
QUICK_SEED, QUICK_SECONDS = 1, 30  # the suite's chaos run


@pytest.mark.slow(seconds=65)
@pytest.mark.postgres  # a private server (initdb), as the database-restart test uses
def test_quick_chaos_run_finds_nothing_wrong(tmp_path: Path) -> None:
    # Seed 1's 30 s schedule sends every kind of event (SIGKILL and SIGTERM, to a trial process and
    # to a worker) and stops the database once (test_the_quick_schedule_sends_every_kind_of_event).
    args = ("--seed", str(QUICK_SEED), "--minutes", str(QUICK_SECONDS / 60), "--workers", "2", "--keep", "2")
    done, rows = run_bench("chaos.py", tmp_path / "chaos.jsonl", *args, timeout=420)
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(line) == KEYS
    assert line["finished"] == line["n_trials"] > 0
    assert line["running"] == line["duplicates"] == line["lost"] == line["orphans"] == 0
    assert line["kept_checkpoints"] == line["keep"] == 2
    assert line["resumed_ok"] == line["retried"] > 0
    assert line["kills"] > 0 and line["db_restarts"] == 1
    (row,) = rows
    assert row["violations"] == [] and row["seed"] == QUICK_SEED and sum(row["kinds"].values()) == line["kills"]


def test_the_quick_schedule_sends_every_kind_of_event() -> None:
    events, db_at, _ = chaos.schedule(QUICK_SEED, QUICK_SECONDS)
    assert {e.kind for e in events} == {kind for kind, _ in chaos.EVENTS}
    assert db_at < QUICK_SECONDS


def test_an_attempt_trained_when_its_own_part_of_the_trial_log_says_so(tmp_path: Path) -> None:
    log = tmp_path / "run/trials/trial-0004/trial.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        "trial 4 of study 'chaos', pid 1, params {}\ntraining starts at epoch 0\nrank 0 reports at epoch 0\n"
        "trial 9 of study 'chaos', pid 2, params {}\nSeed set to 4\n"  # killed in its set-up
        "trial 12 of study 'chaos', pid 3, params {}\nresuming trial 9 from x (saved in epoch 0)\n"
        "training starts at epoch 0\n"
    )
    check = chaos.Chaos.__new__(chaos.Chaos)  # only what _trained reads
    check.work, check._logs = tmp_path, {}
    attempts = [_trial(4, 0), _trial(9, 0, root=4, history=[4]), _trial(12, 0, root=4, history=[4, 9])]
    assert [check._trained(t) for t in attempts] == [True, False, True]
    assert not check._trained(_trial(13, 0, root=13))  # no log at all


def test_a_sigterms_step_is_what_the_trial_process_logged_not_what_the_database_lags_at(tmp_path: Path) -> None:
    """Just after a database restart, a trial can be RUNNING there with no report while its
    process has trained every epoch (its reports and tell wait in the worker, which retries
    them): the step a SIGTERM is judged from comes from the attempt's own part of its trial.log
    (CI, seed 1: trial 0 at step -1 in the database, epoch 4 in its log, rightly completed)."""
    log = tmp_path / "run/trials/trial-0003/trial.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        "trial 3 of study 'chaos', pid 1, params {}\ntraining starts at epoch 0\n"
        "rank 0 reports val_acc=0.5 at epoch 0\nrank 0 reports val_acc=0.6 at epoch 1\n"
        "trial 8 of study 'chaos', pid 2, params {}\nresuming trial 3 from x (saved in epoch 1)\n"
        "training starts at epoch 2\nrank 0 reports val_acc=0.7 at epoch 2\n"
        "rank 0 reports val_acc=0.8 at epoch 3\nrank 0 reports val_acc=0.9 at epoch 4\nfinished: {}\n"
    )
    check = chaos.Chaos.__new__(chaos.Chaos)  # only what _logged_epoch reads
    check.work = tmp_path
    first, retry, other = (_trial(n, 0, trial_dir="trials/trial-0003") for n in (3, 8, 5))
    assert [check._logged_epoch(t) for t in (first, retry, other)] == [1, 4, -1]
    assert check._logged_epoch(_trial(9, 0, trial_dir="trials/trial-0009")) == -1  # no log yet


def test_the_schedule_replays_from_its_seed() -> None:
    a, b, c = chaos.schedule(3, 600), chaos.schedule(3, 600), chaos.schedule(4, 600)
    assert a == b and a != c
    events, db_at, down = a
    assert {e.kind for e in events} == {kind for kind, _ in chaos.EVENTS}
    assert 0.35 * 600 <= db_at <= 0.6 * 600 and 2 <= down <= 5
    assert all(x.at < y.at for x, y in itertools.pairwise(events))


class _Check(chaos.Chaos):
    """The resumption check alone, over hand-made trials."""

    def __init__(self, snapshots: dict[int, int | None], trained: bool = True) -> None:
        self.snapshots = snapshots
        self.trained = trained

    def _trained(self, trial: Any) -> bool:
        return self.trained


def _trial(number: int, steps: int, root: int = 0, **attrs: Any) -> Any:
    history = attrs.pop("history", None)
    t = create_trial(
        state=TrialState.FAIL,
        intermediate_values={i: 0.5 for i in range(steps)},
        user_attrs=attrs,
        system_attrs={"failed_trial": root, "retry_history": history} if history else {},
    )
    t.number = number
    return t


def test_the_resumption_check_tells_a_continued_checkpoint_from_a_lost_one() -> None:
    before = _trial(0, 3)  # reported epochs 0-2
    good = _trial(1, 3, history=[0], resumed_from={"trial": 0, "epoch": 2})
    old = _trial(1, 3, history=[0], resumed_from={"trial": 0, "epoch": 1})  # an older file
    fresh = _trial(1, 3, history=[0])  # started over: the checkpoint was gone
    by_number = {0: before}
    check = _Check({})
    assert check._resume_fault(good, by_number) is None
    assert _Check({}, trained=False)._resume_fault(fresh, by_number) is None  # killed before it trained
    assert "epoch 2" in (check._resume_fault(old, by_number) or "")
    assert "nothing" in (check._resume_fault(fresh, by_number) or "")
    # SIGKILLed mid-save: the newest file on disk (epoch 1), not the last report, is what counts.
    assert _Check({0: 1})._resume_fault(old, by_number) is None
    assert _Check({0: 1})._resume_fault(good, by_number) is not None
    assert _Check({0: None})._resume_fault(fresh, by_number) is None
