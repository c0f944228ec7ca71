from __future__ import annotations

import pytest
from optuna.trial import TrialState

from conftest import Finished, run_cli
from lightstudy.reproduce import reproduce
from lightstudy.study import load_study


@pytest.mark.slow(seconds=8)  # once finished_study is built
def test_reproduce_agrees_to_1e_6_on_cpu(finished_study: Finished) -> None:
    study, spec = load_study(finished_study.url, finished_study.name)
    number = study.best_trial.number
    result = reproduce(study, spec, number)
    assert result.recorded == [study.best_value]
    assert abs(result.differences[0]) <= 1e-6
    assert not result.resumed
    assert result.changed_versions == {}


@pytest.mark.slow(seconds=8)  # once finished_study is built
def test_reproduce_command_prints_both_values_and_the_difference(finished_study: Finished) -> None:
    study, _ = load_study(finished_study.url, finished_study.name)
    number = next(t for t in study.trials if t.state == TrialState.COMPLETE).number
    out = run_cli("reproduce", finished_study.name, "--trial", str(number), "--storage", finished_study.url, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith(f"trial {number} val_acc"))
    assert "recorded" in line and "new" in line and "difference +0" in line


def test_reproduce_refuses_a_trial_that_did_not_complete(finished_study: Finished) -> None:
    out = run_cli("reproduce", finished_study.name, "--trial", "99", "--storage", finished_study.url)
    assert out.returncode == 2 and "has no trial 99" in out.stderr
