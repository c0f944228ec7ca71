from __future__ import annotations

import datetime
import io
import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import tiny_spec
from lightstudy.artifacts import CheckpointRef, make_store, upload_checkpoint
from lightstudy.checkpoints import (
    enforce_retention,
    kept_trials,
    lineage_root,
    load_checkpoint,
    pareto_front,
    sweep_local,
    would_keep,
)
from lightstudy.errors import CheckpointError
from lightstudy.spec import spec_from_dict


def _complete(study: optuna.Study, store, tmp_path: Path, value: float) -> None:
    trial = study.ask()
    file = tmp_path / f"t{trial.number}.ckpt"
    file.write_bytes(b"x" * 10)
    ref = upload_checkpoint(store, study, trial._trial_id, file, file.name)
    trial.set_user_attr("checkpoint", ref.to_dict())
    study.tell(trial, value)


def _stored(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "run" / "artifacts").iterdir())


def test_retention_keeps_exactly_the_top_k_ties_by_number(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec(checkpoints={"keep": 2}))
    store = make_store(spec, tmp_path / "run")
    study = optuna.create_study(direction="maximize")
    for value in [0.5, 0.9, 0.7, 0.9, 0.1]:
        _complete(study, store, tmp_path, value)
        enforce_retention(study, spec, store)
    kept = kept_trials(study.get_trials(), spec)
    assert [t.number for t in kept] == [1, 3]
    assert _stored(tmp_path) == sorted(CheckpointRef.of(t).artifact_id for t in kept)
    # The dashboard's listing (study system attrs) withdraws the removed ones.
    attrs = study._storage.get_study_system_attrs(study._study_id)
    listed = [json.loads(v) for k, v in attrs.items() if k.startswith("dashboard:artifacts:")]
    assert sorted(m["artifact_id"] for m in listed if m) == _stored(tmp_path)


def test_would_keep_decides_before_uploading() -> None:
    spec = spec_from_dict(tiny_spec(checkpoints={"keep": 1}))
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=0.8, user_attrs={"checkpoint": {"artifact_id": "a", "filename": "a"}}
        )
    )
    trials = study.get_trials()
    assert would_keep(trials, spec, 5, [0.9])
    assert not would_keep(trials, spec, 5, [0.7])
    assert not would_keep(trials, spec, 5, [0.8])  # tie: the lower number stays
    assert not would_keep(trials, spec_from_dict(tiny_spec(checkpoints={"keep": 0})), 5, [1.0])


def _failed(minutes_ago: float) -> optuna.trial.FrozenTrial:
    trial = optuna.trial.create_trial(state=TrialState.FAIL)
    trial.datetime_complete = datetime.datetime.now() - datetime.timedelta(minutes=minutes_ago)
    trial.datetime_start = trial.datetime_complete - datetime.timedelta(seconds=5)
    return trial


def test_local_checkpoints_of_live_lineages_stay(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    for number in (0, 1):
        folder = tmp_path / f"trials/trial-{number:04d}/checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
    study.add_trial(_failed(minutes_ago=30))
    study.add_trial(_failed(minutes_ago=30))
    study.add_trial(
        optuna.trial.create_trial(state=TrialState.WAITING, system_attrs={"failed_trial": 1, "retry_history": [1]})
    )
    assert lineage_root(study.get_trials()[2]) == 1
    sweep_local(study, tmp_path)
    assert not (tmp_path / "trials/trial-0000/checkpoints/last.ckpt").exists()
    assert (tmp_path / "trials/trial-0001/checkpoints/last.ckpt").exists()


def test_a_failure_about_to_be_retried_keeps_its_checkpoint(tmp_path: Path) -> None:
    """Regression: the worker tells FAIL, then queues the retry (two writes). Another worker's
    sweep in between deleted the checkpoint, so the retry started over from epoch 0."""
    study = optuna.create_study(direction="maximize")
    for number in (0, 1, 2):
        folder = tmp_path / f"trials/trial-{number:04d}/checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
    study.add_trial(_failed(minutes_ago=0))  # told just now: its retry is not queued yet
    study.add_trial(_failed(minutes_ago=11))  # never retried, its worker gone: swept after the settle time
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.5))
    sweep_local(study, tmp_path)
    assert (tmp_path / "trials/trial-0000/checkpoints/last.ckpt").exists()
    assert not (tmp_path / "trials/trial-0001/checkpoints/last.ckpt").exists()
    assert not (tmp_path / "trials/trial-0002/checkpoints/last.ckpt").exists()
    # The retry is queued and resumes from the file; once it completes, the lineage goes.
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=0.9, system_attrs={"failed_trial": 0, "retry_history": [0]}
        )
    )
    sweep_local(study, tmp_path, settle=0)
    assert not (tmp_path / "trials/trial-0000/checkpoints/last.ckpt").exists()


def test_pareto_front() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values in ([0.9, 10.0], [0.8, 5.0], [0.7, 20.0], [0.9, 10.0]):
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, values=values))
    front = pareto_front(study.get_trials(), ["maximize", "minimize"])
    assert [t.number for t in front] == [0, 1, 3]


class _Evil:
    def __reduce__(self):  # would run code when unpickled without weights_only
        return (print, ("pwned",))


def test_safe_loading_refuses_code_truncation_and_junk(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, good)
    assert load_checkpoint(good)["epoch"] == 3
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        load_checkpoint(evil)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.ckpt")
    plain = io.BytesIO()
    torch.save({"w": torch.ones(1)}, plain)
    plain.seek(0)
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_checkpoint(plain, name="plain")
