from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from conftest import tiny_spec
from lightstudy.checkpoints import enforce_retention, kept_trials, lineage_root, pareto_front
from lightstudy.spec import spec_from_dict


def _complete(study: optuna.Study, run_dir: Path, number: int, value: float) -> None:
    rel = f"trials/trial-{number:04d}/checkpoints/best.ckpt"
    (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / rel).write_bytes(b"x")
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.COMPLETE, value=value, user_attrs={"checkpoint": rel})
    )


def test_keeps_exactly_the_top_k_with_ties_by_number(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec(checkpoints={"keep": 2}))
    study = optuna.create_study(direction="maximize")
    for number, value in enumerate([0.5, 0.9, 0.7, 0.9, 0.1]):
        _complete(study, tmp_path, number, value)
    assert [t.number for t in kept_trials(study.get_trials(), spec)] == [1, 3]
    deleted = enforce_retention(study, spec, tmp_path)
    left = sorted(p.parent.parent.name for p in tmp_path.rglob("*.ckpt"))
    assert left == ["trial-0001", "trial-0003"]
    assert len(deleted) == 3


def test_running_and_waiting_lineages_keep_their_files(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec(checkpoints={"keep": 1}))
    study = optuna.create_study(direction="maximize")
    _complete(study, tmp_path, 0, 0.9)
    last = tmp_path / "trials/trial-0001/checkpoints/last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING, system_attrs={"failed_trial": 1, "retry_history": [1]}
        )
    )
    assert lineage_root(study.get_trials()[2]) == 1
    enforce_retention(study, spec, tmp_path)
    assert last.exists()


def test_keep_zero_keeps_nothing(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec(checkpoints={"keep": 0}))
    study = optuna.create_study(direction="maximize")
    _complete(study, tmp_path, 0, 0.9)
    enforce_retention(study, spec, tmp_path)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_pareto_front() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values in ([0.9, 10.0], [0.8, 5.0], [0.7, 20.0], [0.9, 10.0]):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, values=values))
    front = pareto_front(study.get_trials(), ["maximize", "minimize"])
    assert [t.number for t in front] == [0, 1, 3]
