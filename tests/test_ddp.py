"""Multi-device (DDP) trials on CPU: two gloo processes per trial, launched by the worker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from conftest import tiny_spec, wait_until
from lightstudy.errors import LightstudyError
from lightstudy.launcher import plan_slots
from lightstudy.spec import spec_from_dict
from lightstudy.study import create_study, load_study

TESTS = str(Path(__file__).parent)
# The tests folder (its test models) first, then what this process imports lightstudy from.
PYTHONPATH = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)


def _ddp(n_trials: int, **study: Any) -> dict[str, Any]:
    doc = tiny_spec("ddp", n_trials=n_trials, max_epochs=4, **study)
    doc["trainer"].update(accelerator="cpu", devices=2, strategy="ddp", limit_train_batches=4)
    return doc


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _ended_noting_children(worker: subprocess.Popen[str], seen: set[int]) -> bool:
    """Whether the worker has exited; its live descendants are added to ``seen`` meanwhile."""
    seen.update(_children(worker.pid))
    return worker.poll() is not None


def _worker(url: str, run_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "LIGHTSTUDY_STORAGE": url, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lightstudy", "worker", "--study", "ddp", "--run-dir", str(run_dir), "--threads", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_gpu_groups_for_multi_gpu_trials() -> None:
    slots = plan_slots("0,1,2,3", None, gpus_per_trial=2, cpu_count=16)
    assert [s.gpu for s in slots] == ["0,1", "2,3"]
    assert slots[1].env({})["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(LightstudyError, match="a trial runs on 2 GPUs but only 1 are given"):
        plan_slots("0", None, gpus_per_trial=2)


@pytest.mark.slow
def test_ddp_study_prunes_keeps_checkpoints_and_leaves_no_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # The threshold prunes trials whose first-epoch accuracy is low, and keeps the others.
    doc = _ddp(4, pruner={"name": "ThresholdPruner", "lower": 0.35}, checkpoints={"keep": 2})
    doc["search_space"]["model.init_args.lr"] = {"type": "float", "low": 1e-4, "high": 0.05, "log": True}
    create_study(spec_from_dict(doc), url)
    worker = _worker(url, tmp_path / "run")
    seen: set[int] = set()
    wait_until(lambda: _ended_noting_children(worker, seen), 500, "the worker's exit", interval=0.2)
    out = worker.communicate()[0]
    assert worker.returncode == 0, out
    wait_until(lambda: not _alive(seen), 10, lambda: f"processes of the study outlived it: {_alive(seen)}")
    study, _ = load_study(url, "ddp")
    trials = study.trials
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in trials:
        log = (tmp_path / "run" / "trials" / f"trial-{t.number:04d}" / "trial.log").read_text()
        assert "rank 0 of 2" in log
        assert (tmp_path / "run" / "trials" / f"trial-{t.number:04d}" / "trial.rank1.log").exists()
        # Rank 0 reported each epoch once; the study holds exactly those values.
        reported = [float(v) for v in re.findall(r"rank 0 reports val_acc=([0-9.]+)", log)]
        assert reported == [t.intermediate_values[s] for s in sorted(t.intermediate_values)]
    # ThresholdPruner(lower=0.35) prunes at the first epoch whose accuracy is below 0.35: a
    # trial is pruned exactly when one of its reported values is (the verdict shared by both ranks).
    for t in trials:
        assert t.intermediate_values, t.number
        assert (t.state == TrialState.PRUNED) == (min(t.intermediate_values.values()) < 0.35), (
            t.number,
            t.state,
            t.intermediate_values,
        )
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(list((tmp_path / "run" / "artifacts").iterdir())) == min(2, len(complete))


@pytest.mark.slow
def test_kill_9_of_one_rank_takes_the_trial_down_cleanly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    doc = _ddp(1, pruner=None)
    doc["model"]["class_path"] = "lightstudy_testing_models.SlowNet"
    doc["model"]["init_args"]["step_sleep"] = 0.05
    create_study(spec_from_dict(doc), url)
    worker = _worker(url, tmp_path / "run")
    last = tmp_path / "run" / "trials" / "trial-0000" / "checkpoints" / "last.ckpt"
    seen: set[int] = set()

    def saved() -> bool:  # the trial's processes, noted while they run
        seen.update(_children(worker.pid))
        return last.exists()

    wait_until(saved, 180, "the trial's last.ckpt", proc=worker)
    rank1 = next(
        int(m) for m in re.findall(r"pid (\d+), rank 1 of 2", (last.parents[1] / "trial.rank1.log").read_text())
    )
    os.kill(rank1, signal.SIGKILL)
    wait_until(lambda: _ended_noting_children(worker, seen), 500, "the worker's exit", interval=0.2)
    out = worker.communicate()[0]
    assert worker.returncode == 0, out
    wait_until(lambda: not _alive(seen), 10, lambda: f"processes of the trial outlived it: {_alive(seen)}")
    study, _ = load_study(url, "ddp")
    first, retry = study.trials
    assert first.state == TrialState.FAIL and "rank 1" in first.user_attrs["fail_reason"]
    assert "SIGKILL" in first.user_attrs["fail_reason"]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from"]["trial"] == 0
