"""Schedulers in the workers (issue 13): claims, promoted trials' starts, kill -9, checkpoints.

Small on purpose: 8-channel ConvNet, two batches an epoch, one or two epochs a rung.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from conftest import tiny_spec, wait_until
from lightstudy.artifacts import CheckpointRef
from lightstudy.checkpoints import kept_trials, needed_trials
from lightstudy.spec import spec_from_dict
from lightstudy.study import claim_trial, create_study, load_study
from lightstudy.worker import Worker

TESTS = str(Path(__file__).parent)
PYTHONPATH = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)


def _asha(n_trials: int = 3, max_resource: int = 2, **model: Any) -> dict[str, Any]:
    doc = tiny_spec(n_trials=n_trials, max_epochs=max_resource)
    doc["study"]["scheduler"] = {"name": "ASHA", "min_resource": 1, "max_resource": max_resource, "reduction_factor": 3}
    doc["study"]["checkpoints"] = {"keep": 2}
    doc["trainer"].update(limit_train_batches=2, limit_val_batches=2)
    doc["model"]["class_path"] = "lightstudy_testing_models.WeightsNet"
    doc["model"]["init_args"].update(model)
    return doc


def _local_checkpoints(run_dir: Path) -> set[str]:
    """Trial folders that hold a checkpoint file."""
    return {p.parent.parent.name for p in (run_dir / "trials").glob("trial-*/checkpoints/*.ckpt")}


def _stored(run_dir: Path, trials: Any) -> set[int]:
    """Trials whose checkpoint is in the artifact store (a removed one keeps its attr, not its file)."""
    files = {p.name for p in (run_dir / "artifacts").iterdir()}
    return {t.number for t in trials if (ref := CheckpointRef.of(t)) is not None and ref.artifact_id in files}


def _folders(trials: Any, numbers: set[int]) -> set[str]:
    return {Path(t.user_attrs["trial_dir"]).name for t in trials if t.number in numbers}


@pytest.fixture(scope="module")
def asha_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An ASHA study (3 configurations, rungs of 1 and 2 epochs) run by one worker in two goes:
    the 3 rung-0 trials, then the promotion; what the disk held after each."""
    tmp = tmp_path_factory.mktemp("asha")
    url = f"sqlite:///{tmp / 'study.db'}"
    run_dir = tmp / "run"
    create_study(spec_from_dict(_asha()), url)
    first = Worker(url, "tiny", run_dir=run_dir, threads=1, max_trials=3).run()
    study, spec = load_study(url, "tiny")
    trials = study.get_trials()
    middle = {
        "local": _local_checkpoints(run_dir),
        "needed": _folders(trials, needed_trials(trials, spec)),
        "kept": {t.number for t in kept_trials(trials, spec)},
        "stored": _stored(run_dir, trials),
    }
    second = Worker(url, "tiny", run_dir=run_dir, threads=1).run()
    study, spec = load_study(url, "tiny")
    return {"url": url, "run_dir": run_dir, "first": first, "second": second, "middle": middle, "spec": spec}


def test_a_promoted_trial_continues_its_parents_steps_and_weights(asha_run: dict[str, Any]) -> None:
    assert (asha_run["first"].complete, asha_run["second"].complete) == (3, 1)
    study, _ = load_study(asha_run["url"], "tiny")
    trials = study.get_trials()
    [child] = [t for t in trials if t.user_attrs.get("parent_trial") is not None]
    parent = trials[child.user_attrs["parent_trial"]]
    assert (child.user_attrs["rung"], child.user_attrs["lineage"], child.user_attrs["epochs"]) == (1, parent.number, 2)
    assert parent.user_attrs["rung"] == 0 and parent.user_attrs["lineage"] == parent.number
    assert child.params == parent.params
    assert sorted(parent.intermediate_values) == [0]
    assert sorted(child.intermediate_values) == [1]  # its first step is its parent's last + 1
    assert child.user_attrs["resumed_from"]["trial"] == parent.number
    assert parent.value == max(t.value for t in trials if t.user_attrs["rung"] == 0)  # the best went on
    run_dir = asha_run["run_dir"]
    parent_log = (run_dir / parent.user_attrs["trial_dir"] / "trial.log").read_text()
    child_log = (run_dir / child.user_attrs["trial_dir"] / "trial.log").read_text()
    [parent_end] = re.findall(r"weights after epoch 0: (\S+)", parent_log)
    [child_start] = re.findall(r"weights at start: (\S+)", child_log)
    assert child_start == parent_end, (parent_log, child_log)  # the parent's weights, not a fresh start
    assert "training starts at epoch 1" in child_log
    # The results rank the highest rung reached: the promoted trial is the best and its checkpoint kept.
    from lightstudy.ranking import ranked

    assert [t.number for t in ranked(trials, asha_run["spec"])] == [child.number]


def test_the_kept_checkpoints_are_those_still_needed_plus_the_top_k(asha_run: dict[str, Any]) -> None:
    middle = asha_run["middle"]
    # After rung 0: exactly the one configuration that rung 1 may still promote keeps its local file ...
    assert middle["local"] == middle["needed"] and len(middle["needed"]) == 1
    # ... and the store holds the top k (keep: 2) of the highest rung reached, nothing else.
    assert middle["kept"] == middle["stored"] and len(middle["stored"]) == 2
    study, spec = load_study(asha_run["url"], "tiny")
    trials = study.get_trials()
    assert needed_trials(trials, spec) == set()
    assert _local_checkpoints(asha_run["run_dir"]) == set()  # nothing can need one any more
    [top] = [t.number for t in trials if t.user_attrs["rung"] == 1]
    assert _stored(asha_run["run_dir"], trials) == {top}  # the top k of the top rung: it alone
    assert len(list((asha_run["run_dir"] / "artifacts").iterdir())) == 1


def _complete_rung0(study: Any, values: list[float]) -> None:
    """Rung-0 trials, complete, as a worker leaves them (no training)."""
    import optuna

    for i, value in enumerate(values):
        trial = study.ask()
        trial.suggest_float("model.init_args.lr", 1e-3, 3e-2, log=True)
        trial.suggest_categorical("data.init_args.batch_size", [64, 128])
        attrs = {"lineage": trial.number, "rung": 0, "epochs": 1, "trial_dir": f"trials/trial-{trial.number:04d}"}
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        trial.report(value, 0)
        study.tell(trial, value, state=optuna.trial.TrialState.COMPLETE)
        assert i == trial.number


def test_two_workers_never_promote_the_same_configuration_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = spec_from_dict(_asha(n_trials=9, max_resource=9))
    _complete_rung0(create_study(spec, url), [0.1 * i for i in range(9)])  # 3 promotable: 8, 7, 6
    barrier = threading.Barrier(2)
    claims: list[tuple[int, Any]] = []

    def claimer() -> None:
        study, spec = load_study(url, "tiny")  # each its own storage, as two workers
        barrier.wait()
        while True:
            trial, budget = claim_trial(study, spec)
            if trial is None:
                assert not budget.done  # others run: wait, not done
                return
            frozen = study._storage.get_trial(trial._trial_id)
            claims.append((frozen.user_attrs.get("parent_trial"), frozen))

    threads = [threading.Thread(target=claimer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    parents = [p for p, _ in claims]
    assert sorted(parents) == [6, 7, 8], parents  # each promotable configuration once, nothing sampled
    for parent, frozen in claims:
        assert frozen.state == TrialState.RUNNING
        assert (frozen.user_attrs["lineage"], frozen.user_attrs["rung"], frozen.user_attrs["epochs"]) == (parent, 1, 3)
    study, _ = load_study(url, "tiny")
    by_number = {t.number: t for t in study.get_trials()}
    for parent, frozen in claims:
        assert frozen.params == by_number[parent].params


def _worker_process(url: str, run_dir: Path) -> Any:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "LIGHTSTUDY_STORAGE": url, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "lightstudy", "worker", "--study", "tiny", "--run-dir", str(run_dir)]
    return subprocess.Popen(
        [*command, "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow(seconds=60)
def test_kill_9_of_a_worker_during_a_promoted_trial_leaves_the_study_exact(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    hold = tmp_path / "hold"
    doc = _asha(n_trials=3, max_resource=3, hold=str(hold), hold_epoch=2)  # the promotion trains epochs 1-2
    doc["model"]["class_path"] = "lightstudy_testing_models.HoldNet"
    create_study(spec_from_dict(doc), url)
    run_dir = tmp_path / "run"
    victim = _worker_process(url, run_dir)
    # The promoted trial is in epoch 2's validation, epoch 1's last.ckpt its own.
    wait_until(hold.exists, what="the promoted trial's hold file", proc=victim)
    victim.kill()
    victim.wait()
    survivor = Worker(url, "tiny", run_dir=run_dir, threads=1).run()  # reaps the dead trial, retries it
    assert (survivor.complete, survivor.failed) == (1, 0), survivor
    study, _ = load_study(url, "tiny")
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    # Exact: 3 configurations at rung 0, one promoted once; nothing lost, nothing twice.
    assert sorted((t.user_attrs["rung"], t.user_attrs["lineage"]) for t in done) == sorted(
        {(t.user_attrs["rung"], t.user_attrs["lineage"]) for t in done}
    )
    assert sorted(t.user_attrs["rung"] for t in done) == [0, 0, 0, 1]
    [dead] = [t for t in trials if t.state == TrialState.FAIL]
    [retry] = [t for t in done if t.user_attrs["rung"] == 1]
    assert dead.user_attrs["rung"] == 1 and dead.user_attrs["lineage"] == retry.user_attrs["lineage"]
    assert retry.user_attrs["parent_trial"] == dead.user_attrs["parent_trial"]  # the same job
    assert retry.user_attrs["resumed_from"]["trial"] == dead.number  # from its own last.ckpt ...
    assert retry.user_attrs["resumed_from"]["epoch"] == 1  # ... the epoch it finished
    assert sorted(retry.intermediate_values) == [1, 2]  # epoch 1 inherited, epoch 2 reported
    log = (run_dir / dead.user_attrs["trial_dir"] / "trial.log").read_text()
    assert re.findall(r"weights after epoch 1: (\S+)", log)[-1] == re.findall(r"weights at start: (\S+)", log)[-1]
    assert _local_checkpoints(run_dir) == set()


def test_a_pbt_exploit_is_claimed_with_its_lineage_and_a_retry_stays_the_same_job(tmp_path: Path) -> None:
    import optuna

    from lightstudy.storage.boundary import storage_of
    from lightstudy.study import budget

    url = f"sqlite:///{tmp_path / 'study.db'}"
    doc = _asha(n_trials=4)
    doc["study"]["scheduler"] = {"name": "PBT", "population": 4, "interval": 2, "max_resource": 6}
    spec = spec_from_dict(doc)
    study = create_study(spec, url)
    for value in (0.1, 0.5, 0.6, 0.9):  # member 0 is the worst: it copies the best (trial 3)
        trial = study.ask()
        trial.suggest_float("model.init_args.lr", 1e-3, 3e-2, log=True)
        trial.suggest_categorical("data.init_args.batch_size", [64, 128])
        for key, v in {"lineage": trial.number, "generation": 0, "epochs": 2}.items():
            trial.set_user_attr(key, v)
        trial.report(value - 0.05, 0)
        trial.report(value, 1)
        study.tell(trial, value, state=optuna.trial.TrialState.COMPLETE)
    study, spec = load_study(url, "tiny")
    trial, _ = claim_trial(study, spec)
    assert trial is not None
    frozen = study._storage.get_trial(trial._trial_id)
    attrs = {k: frozen.user_attrs[k] for k in ("parent_trial", "lineage", "generation", "epochs")}
    assert attrs == {"parent_trial": 3, "lineage": 0, "generation": 1, "epochs": 4}
    source = study.trials[3].params
    assert frozen.params != source and frozen.params.keys() == source.keys()  # explored
    assert 1e-3 <= frozen.params["model.init_args.lr"] <= 3e-2
    assert budget(study.get_trials(), spec).used == 4  # PBT steps are no new configurations
    # The trial's worker dies; its retry (user attrs copied) is the next claim: the same job.
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    storage_of(study).requeue(study, study._storage.get_trial(trial._trial_id), None)
    again, _ = claim_trial(study, spec)
    assert again is not None and again.number == trial.number + 1
    retried = study._storage.get_trial(again._trial_id)
    assert {k: retried.user_attrs[k] for k in attrs} == attrs and retried.params == frozen.params
    third, _ = claim_trial(study, spec)  # member 1 (fewest epochs, next lineage) continues its own
    assert third is not None
    continued = study._storage.get_trial(third._trial_id)
    assert (continued.user_attrs["lineage"], continued.user_attrs["parent_trial"]) == (1, 1)
    assert continued.params == study.trials[1].params


def test_a_promotion_whose_parent_checkpoint_is_missing_fails_saying_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create_study(spec_from_dict(_asha(n_trials=3)), url)
    _complete_rung0(study, [0.2, 0.9, 0.5])  # trial 1 is promoted; its files are on no disk here
    report = Worker(url, "tiny", run_dir=tmp_path / "run", threads=1, max_trials=1).run()
    assert (report.failed, report.complete) == (1, 0)
    study, _ = load_study(url, "tiny")
    [failed] = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert failed.user_attrs["parent_trial"] == 1
    assert "checkpoint of parent trial 1" in failed.user_attrs["fail_reason"]
    assert "share the run folder" in failed.user_attrs["fail_reason"]


def test_the_sweep_keeps_what_a_pbt_member_may_still_continue_from_one_read(tmp_path: Path) -> None:
    """Needed and running are counted from one read of the trials: a member's latest trial that
    completed between two reads was swept once (PBT run: its continuation failed, no checkpoint)."""
    import optuna

    from lightstudy.checkpoints import sweep_local

    url = f"sqlite:///{tmp_path / 'study.db'}"
    doc = _asha(n_trials=2)
    doc["study"]["scheduler"] = {"name": "PBT", "population": 2, "interval": 1, "max_resource": 3}
    study = create_study(spec_from_dict(doc), url)
    run_dir = tmp_path / "run"
    members = {0: (0, 0, None), 1: (1, 0, None), 2: (0, 1, 0)}  # number: (lineage, generation, parent)
    for number, (lineage, generation, parent) in members.items():
        trial = study.ask()
        trial.suggest_float("model.init_args.lr", 1e-3, 3e-2, log=True)
        trial.suggest_categorical("data.init_args.batch_size", [64, 128])
        attrs = {"lineage": lineage, "generation": generation, "epochs": generation + 1}
        attrs["trial_dir"] = f"trials/trial-{number:04d}"
        if parent is not None:
            attrs["parent_trial"] = parent
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        trial.report(0.5, generation)
        study.tell(trial, 0.5, state=optuna.trial.TrialState.COMPLETE)
        folder = run_dir / attrs["trial_dir"] / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
    study, spec = load_study(url, "tiny")
    sweep_local(study, run_dir, spec=spec)
    # member 0 continues from trial 2, member 1 from trial 1; trial 0 is superseded
    assert _local_checkpoints(run_dir) == {"trial-0001", "trial-0002"}


def test_a_scheduled_study_refuses_the_proxy_whose_claims_are_not_serialized() -> None:
    from types import SimpleNamespace

    from optuna.storages import GrpcStorageProxy

    from lightstudy.errors import LightstudyError

    proxy = SimpleNamespace(_storage=GrpcStorageProxy(host="127.0.0.1", port=1))  # never reached
    with pytest.raises(LightstudyError, match="lightstudy proxy does not serialize its claims"):
        claim_trial(proxy, spec_from_dict(_asha()))  # type: ignore[arg-type]
