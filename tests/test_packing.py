"""GPU packing by measured memory (``--trials-per-gpu auto``, lightstudy.packing), on the CPU.

The decision, the plan files, the gate and the retry policy are tested without training; one
end-to-end run shows the launcher going from 1 to 2 workers on a (stand-in) GPU after the first
trial and a trial that runs out of memory beside another retried alone, then completing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import tiny_spec, write_spec
from lightstudy import gpu_share, packing
from lightstudy.errors import LightstudyError
from lightstudy.gpu_share import GpuState
from lightstudy.launcher import plan_slots
from lightstudy.packing import CONTEXT_BYTES, MAX_PER_GPU, Plan, decide, plan_from_records

GiB = 2**30


# --- the decision ----------------------------------------------------------------------------


def test_decide_fits_what_the_margin_allows() -> None:
    # need = 3 GiB * 1.25 + 0.5 GiB = 4.25 GiB; usable = 90% of 10 GiB = 9 GiB: two fit, not three.
    plan = decide([3 * GiB], 10 * GiB)
    assert plan.slots == 2
    assert plan.need == int(3.75 * GiB) + CONTEXT_BYTES
    assert plan.usable == int(9 * GiB)
    # each trial's allocator cap: its share of the usable memory less its CUDA context
    assert plan.fraction == pytest.approx((4.5 - 0.5) / 10, abs=1e-4)
    assert plan.fraction * 10 * GiB >= 3 * GiB * packing.HEADROOM  # the measured trial fits its cap


def test_decide_takes_the_largest_peak_and_what_other_programs_leave() -> None:
    assert decide([1 * GiB, 3 * GiB], 10 * GiB).slots == 2
    # 5 GiB held by another program: 5 GiB available, one 4.25 GiB trial
    assert decide([3 * GiB], 10 * GiB, available=5 * GiB) == Plan(1, None, int(3.75 * GiB) + CONTEXT_BYTES, 5 * GiB)


def test_decide_bounds() -> None:
    tiny = decide([10 * 2**20], 80 * GiB)
    assert tiny.slots == MAX_PER_GPU and tiny.fraction is not None
    assert decide([10 * 2**20], 80 * GiB, max_per_gpu=3).slots == 3
    huge = decide([9 * GiB], 10 * GiB)
    assert huge.slots == 1 and huge.fraction is None  # alone and uncapped: as without packing
    with pytest.raises(ValueError, match="at least one measured peak"):
        decide([], 10 * GiB)


def test_plan_from_records_waits_for_a_measure_and_skips_out_of_memory_ones() -> None:
    assert plan_from_records([]) is None
    oom = {"peak": 9 * GiB, "total": 10 * GiB, "oom": True}
    assert plan_from_records([oom]) is None
    good = {"peak": 3 * GiB, "reserved": 3 * GiB, "total": 10 * GiB, "free": 7 * GiB - CONTEXT_BYTES}
    plan = plan_from_records([oom, good])
    assert plan is not None and plan.slots == 2
    # a GPU where another program holds 4 GiB: the free memory says so
    crowded = {**good, "free": 3 * GiB - CONTEXT_BYTES}
    assert plan_from_records([crowded]) == decide([3 * GiB], 10 * GiB, available=6 * GiB)


def test_trials_per_gpu_parsing() -> None:
    assert packing.parse_trials_per_gpu("auto") is None
    assert packing.parse_trials_per_gpu(" AUTO ") is None
    assert packing.parse_trials_per_gpu("3") == 3
    assert packing.parse_trials_per_gpu(2) == 2
    assert [s.gpu for s in plan_slots("0,1", None, "auto", cpu_count=4)] == ["0", "1"]  # one each, to start
    assert [s.gpu for s in plan_slots("0", None, "2", cpu_count=4)] == ["0", "0"]
    for bad in ("half", "0", "-1"):
        with pytest.raises(LightstudyError, match="--trials-per-gpu"):
            plan_slots("0", None, bad)


def test_out_of_memory_is_recognised() -> None:
    import torch

    from lightstudy.ranks import exit_reason

    assert packing.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    try:
        try:
            raise torch.cuda.OutOfMemoryError("Tried to allocate 2 GiB")
        except RuntimeError as inner:
            raise RuntimeError("the trainer failed") from inner
    except RuntimeError as wrapped:
        assert packing.is_out_of_memory(wrapped)
    assert not packing.is_out_of_memory(ValueError("out of patience"))
    assert packing.died_of_memory(exit_reason(-9))
    assert not packing.died_of_memory(exit_reason(-15)) and not packing.died_of_memory(None)


# --- the plan files and the gate -------------------------------------------------------------


def test_a_plan_is_read_only_while_its_launcher_runs(tmp_path: Path) -> None:
    import os

    gpu_share.write_state(tmp_path, GpuState("0,1", True, 2, 0.4, os.getpid()))
    assert gpu_share.read_state(tmp_path, "0,1") == GpuState("0,1", True, 2, 0.4, os.getpid())
    assert gpu_share.read_state(tmp_path, "0") is None and gpu_share.read_state(tmp_path, None) is None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    gpu_share.write_state(tmp_path, GpuState("2", True, 2, 0.4, gone.pid))
    assert gpu_share.read_state(tmp_path, "2") is None  # a killed launcher's plan caps nothing
    gpu_share.clear(tmp_path)
    assert not (tmp_path / "packing").exists()


def _enter(gate: gpu_share.Gate, alone: bool, order: list[str], name: str) -> threading.Thread:
    def run() -> None:
        gate.enter(alone)
        order.append(name)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_trial_alone_waits_for_the_running_ones_and_holds_new_ones_back(tmp_path: Path) -> None:
    order: list[str] = []
    running = gpu_share.Gate(tmp_path, "0")
    running.enter(False)
    other = gpu_share.Gate(tmp_path, "0")
    other.enter(False)  # two packed trials run together
    alone = gpu_share.Gate(tmp_path, "0")
    t_alone = _enter(alone, True, order, "alone")
    t_alone.join(0.5)
    assert t_alone.is_alive(), "the trial alone started while others ran"
    later = gpu_share.Gate(tmp_path, "0")
    t_later = _enter(later, False, order, "later")
    running.close()
    t_alone.join(0.5)
    assert t_alone.is_alive()  # one still runs
    other.close()  # ... and ends: the trial alone runs
    t_alone.join(10)
    assert order == ["alone"]
    t_later.join(0.5)
    assert t_later.is_alive(), "a new trial started beside the one running alone"
    alone.close()
    t_later.join(10)
    assert order == ["alone", "later"]
    later.close()


def test_a_forked_child_holding_the_gate_does_not_keep_it(tmp_path: Path) -> None:
    import os
    import signal

    running = gpu_share.Gate(tmp_path, "0")
    running.enter(False)
    child = os.fork()  # as a DataLoader worker would: it holds copies of the gate's fds
    if child == 0:
        signal.pause()
        os._exit(0)
    try:
        running.close()
        alone = gpu_share.Gate(tmp_path, "0")
        order: list[str] = []
        thread = _enter(alone, True, order, "alone")
        thread.join(10)
        assert order == ["alone"], "a forked child's copy of the fd kept the GPU"
        alone.close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_another_gpu_is_not_held(tmp_path: Path) -> None:
    alone = gpu_share.Gate(tmp_path, "0")
    alone.enter(True)
    elsewhere = gpu_share.Gate(tmp_path, "1")
    assert elsewhere.enter(False) < 5
    elsewhere.close()
    alone.close()


# --- the trial's side, with the stand-in probe -----------------------------------------------


class _Trial:
    def __init__(self) -> None:
        self.user_attrs: dict[str, Any] = {}

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def _job(tmp_path: Path, hidden: int = 16) -> Any:
    return SimpleNamespace(
        run_dir=str(tmp_path), trial_dir="trials/trial-0002", params={"model.init_args.hidden": hidden}, rank=0
    )


FAKE = {"total": 10 * GiB, "peak": 3 * GiB, "param": "model.init_args.hidden", "peaks": {"48": 5 * GiB}}


def _memory(tmp_path: Path, hidden: int, monkeypatch: pytest.MonkeyPatch) -> tuple[gpu_share.TrialMemory, _Trial]:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv(packing.FAKE_VAR, json.dumps(FAKE))
    trial = _Trial()
    return gpu_share.TrialMemory(_job(tmp_path, hidden), trial), trial


def test_a_packed_trial_is_capped_and_one_over_its_cap_is_retried_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from lightstudy.trial import _describe

    gpu_share.write_state(tmp_path, GpuState("0", True, 2, 0.4, os.getpid()))
    fits, trial = _memory(tmp_path, 16, monkeypatch)
    with fits:
        pass
    record = trial.user_attrs[packing.MEMORY_ATTR]
    assert record["fraction"] == 0.4 and record["peak"] == 3 * GiB and not record["oom"] and not record["alone"]

    big, trial = _memory(tmp_path, 48, monkeypatch)
    with pytest.raises(Exception, match="CUDA out of memory") as raised, big:
        pass
    assert trial.user_attrs[packing.MEMORY_ATTR]["oom"] is True
    alone, why = big.out_of_memory(_describe(raised.value))
    assert alone and why.endswith("; retried alone"), why

    # the worker marked the lineage: its next attempt runs alone, uncapped, and fits
    gpu_share.mark_alone(tmp_path / "trials/trial-0002", "out of memory")
    again, trial = _memory(tmp_path, 48, monkeypatch)
    with again:
        pass
    assert trial.user_attrs[packing.MEMORY_ATTR]["alone"] is True
    assert trial.user_attrs[packing.MEMORY_ATTR]["fraction"] is None


def test_out_of_memory_alone_fails_with_the_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import torch

    from lightstudy.trial import _describe

    gpu_share.write_state(tmp_path, GpuState("0", True, 2, 0.4, os.getpid()))
    gpu_share.mark_alone(tmp_path / "trials/trial-0002", "out of memory")
    memory, _ = _memory(tmp_path, 48, monkeypatch)
    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(torch.cuda.OutOfMemoryError), memory:
        raise error
    alone, why = memory.out_of_memory(_describe(error))
    assert not alone
    assert "out of GPU memory even alone on GPU 0" in why
    assert "CUDA out of memory. Tried to allocate 20.00 GiB" in why
    # no launcher's plan (a lone `lightstudy worker`): failed with the error, as before packing
    gpu_share.clear(tmp_path)
    lone, _ = _memory(tmp_path, 48, monkeypatch)
    with lone:
        pass
    alone, why = lone.out_of_memory(_describe(error))
    assert not alone and why.startswith("OutOfMemoryError: CUDA out of memory"), why


# --- the worker's retry policy ---------------------------------------------------------------


def test_out_of_memory_retries_do_not_use_up_max_retry(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from lightstudy.spec import spec_from_dict
    from lightstudy.study import create_study
    from lightstudy.trial import Outcome
    from lightstudy.worker import RECORD, Worker

    assert RECORD[Outcome.OUT_OF_MEMORY] == ("FAIL", "alone")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create_study(spec_from_dict(tiny_spec("oom", max_retry=1)), url)
    worker = Worker(url, "oom", run_dir=tmp_path / "run")

    def fail_latest() -> Any:  # ask takes the queued retry first
        trial = study.ask()
        study.tell(trial, state=TrialState.FAIL)
        return trial

    first = fail_latest()
    assert worker._retry(first, max_retry=None, alone="CUDA out of memory") is True  # out of memory: free
    assert (tmp_path / "run" / "trials" / "trial-0000" / packing.ALONE_MARK).exists()
    second = fail_latest()  # the retry (alone) died: max_retry=1 allows one retry of that
    assert second.number == 1
    assert worker._retry(second, max_retry=1) is True
    third = fail_latest()
    assert worker._retry(third, max_retry=1) is False  # now max_retry is used up
    waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert waiting == []
    assert [len(t.system_attrs.get("retry_history", [])) for t in study.get_trials()] == [0, 1, 2]


def test_a_packed_trial_killed_by_the_oom_killer_is_retried_alone(tmp_path: Path) -> None:
    import os

    from optuna.trial import TrialState

    from lightstudy.ranks import exit_reason
    from lightstudy.spec import spec_from_dict
    from lightstudy.study import create_study
    from lightstudy.worker import Worker

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create_study(spec_from_dict(tiny_spec("killed", max_retry=0)), url)
    run = tmp_path / "run"
    worker = Worker(url, "killed", run_dir=run, gpu="0")
    gpu_share.write_state(run, GpuState("0", True, 2, 0.4, os.getpid()))
    trial = study.ask()
    worker._finish(trial, None, exit_reason(-9), "trials/trial-0000", 1.0)
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and retry.state == TrialState.WAITING  # max_retry 0: not one of those
    assert retry.system_attrs[packing.FREE_RETRIES_ATTR] == 1
    assert failed.user_attrs[packing.RETRIED_ALONE_ATTR] is True and packing.RETRIED_ALONE_ATTR not in retry.user_attrs
    assert gpu_share.runs_alone(run / "trials" / "trial-0000")
    assert worker.report.interrupted == 1 and worker.report.failed == 0
    # killed again, alone this time: a death like any other (max_retry 0: no retry)
    again = study.ask()
    worker._finish(again, None, exit_reason(-9), "trials/trial-0000", 1.0)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL]
    assert worker.report.failed == 1
    # without a packed plan (one trial per GPU), a SIGKILL is an ordinary death
    gpu_share.write_state(run, GpuState("0", False, 1, None, os.getpid()))
    assert not Worker._died_of_memory_packed(worker, exit_reason(-9), "trials/trial-0005")
    gpu_share.write_state(run, GpuState("0", False, 2, None, os.getpid()))
    assert Worker._died_of_memory_packed(worker, exit_reason(-9), "trials/trial-0005")
    assert not Worker._died_of_memory_packed(worker, exit_reason(-15), "trials/trial-0005")


# --- end to end: the launcher on a stand-in GPU -----------------------------------------------


@pytest.mark.slow(seconds=45)
def test_auto_packing_adds_a_worker_and_retries_an_out_of_memory_trial_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial 0 (3 GiB of a 10 GiB stand-in GPU) runs alone; then 2 trials fit, each capped at 40%.
    The trial with hidden=48 needs 5 GiB: over its cap it runs out of memory, is retried alone
    (max_retry is 0: that retry is not one) and completes; four trials count, as n_trials says."""
    from optuna.trial import TrialState
    from rich.console import Console

    import lightstudy
    from lightstudy.spec import spec_from_dict
    from lightstudy.study import create_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(packing.FAKE_VAR, json.dumps(FAKE))
    doc = tiny_spec("packed", n_trials=4, max_epochs=1, max_retry=0)
    doc["trainer"].update(limit_train_batches=2, limit_val_batches=1)
    doc["search_space"]["model.init_args.hidden"] = {"type": "categorical", "choices": [16, 48]}
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec_path = write_spec(tmp_path / "packed.yaml", doc)
    study = create_study(spec_from_dict(doc), url)
    for hidden in (16, 16, 48, 16):
        study.enqueue_trial(
            {"model.init_args.lr": 0.01, "data.init_args.batch_size": 64, "model.init_args.hidden": hidden}
        )

    shown = Console(record=True, width=200, force_jupyter=False)
    lightstudy.run(spec_path, gpus="0", trials_per_gpu="auto", storage=url, console=shown)
    text = shown.export_text()
    assert "1 worker(s) (GPU 0)" in text, text
    assert "2 trial(s) at once, each capped at 40% of its memory" in text, text
    assert "oom→alone" in text, text

    trials = sorted(study.get_trials(), key=lambda t: t.number)
    mem = {t.number: t.user_attrs.get(packing.MEMORY_ATTR) or {} for t in trials}
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 4
    first = trials[0]
    assert mem[0]["fraction"] is None and not mem[0]["alone"]  # measured alone, uncapped
    # 1 -> 2 workers once trial 0 was told: the plan (and the second worker with it) came after
    # its line; whatever the second worker claimed started after trial 0 had finished (how many
    # it got depends on how fast it starts: the first worker does not wait for it)
    assert text.index("trial    0 complete") < text.index("2 trial(s) at once"), text
    assert sorted(p.name for p in (tmp_path / "runs" / "packed" / "workers").glob("worker-*.log")) == [
        "worker-0.log",
        "worker-1.log",
    ]
    assert "worker done" in (tmp_path / "runs" / "packed" / "workers" / "worker-1.log").read_text()
    late = [t for t in trials if t.user_attrs["worker"] != first.user_attrs["worker"]]
    assert all(t.datetime_start > first.datetime_complete for t in late)
    # the out-of-memory trial: capped and failed, then retried alone and complete
    oom = [t for t in trials if t.state == TrialState.FAIL]
    assert len(oom) == 1 and oom[0].params["model.init_args.hidden"] == 48
    assert mem[oom[0].number]["oom"] and mem[oom[0].number]["fraction"] == 0.4
    assert "retried alone" in oom[0].user_attrs["fail_reason"] and oom[0].user_attrs["retried_alone"] is True
    retry = next(t for t in trials if (t.system_attrs.get("retry_history") or [None])[-1] == oom[0].number)
    assert retry.state == TrialState.COMPLETE and mem[retry.number]["alone"] and mem[retry.number]["fraction"] is None
    # capped trials after the plan, and nothing else ran on the GPU while the retry did
    assert all(mem[t.number]["fraction"] == 0.4 for t in trials if t.number not in (0, retry.number))
    start, end = mem[retry.number]["ran"]
    for t in trials:
        if t.number != retry.number:
            other_start, other_end = mem[t.number]["ran"]
            assert other_end <= start or other_start >= end, (t.number, mem[t.number]["ran"], (start, end))
    assert not (tmp_path / "runs" / "packed" / "packing").exists()  # the launcher's plans went with it


# --- bench/gpu_packing.py (it measures on a GPU; here it must start and say there is none) ----


def test_gpu_bench_says_no_cuda_device_and_exits_2() -> None:
    import os

    bench = Path(__file__).resolve().parents[1] / "bench" / "gpu_packing.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, on any machine
    done = subprocess.run([sys.executable, str(bench), "--quick"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "no CUDA device" in done.stderr and "Traceback" not in done.stderr


def test_gpu_bench_counts_trials_at_once() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_packing.py"
    spec = importlib.util.spec_from_file_location("gpu_packing_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.most_at_once([]) == 0
    assert module.most_at_once([(0, 2), (1, 3), (2.5, 4), (5, 6)]) == 2
    assert module.most_at_once([(0, 10), (1, 3), (2, 4)]) == 3


def test_a_bad_trials_per_gpu_is_one_line_before_any_study_is_made(tmp_path: Path) -> None:
    from conftest import run_cli

    spec = write_spec(tmp_path / "bad.yaml", tiny_spec("bad"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = run_cli("run", str(spec), "--storage", url, "--gpus", "0", "--trials-per-gpu", "half")
    assert result.returncode == 2, result
    assert "--trials-per-gpu must be a count like 2 or 'auto', but got 'half'" in result.stderr + result.stdout
    assert not (tmp_path / "study.db").exists()


def test_a_probe_that_fails_does_not_replace_the_trials_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    memory, trial = _memory(tmp_path, 16, monkeypatch)

    def broken() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(memory.probe, "measure", broken)
    with pytest.raises(ValueError, match="the trial's own error"), memory:
        raise ValueError("the trial's own error")
    assert packing.MEMORY_ATTR not in trial.user_attrs
    assert "could not record the trial's GPU memory: RuntimeError" in capsys.readouterr().out


def test_only_a_complete_or_pruned_trial_makes_later_ones_wait_for_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import optuna

    gpu_share.write_state(tmp_path, GpuState("0", True, None, None, os.getpid()))
    failing, trial = _memory(tmp_path, 16, monkeypatch)
    with pytest.raises(ValueError), failing:
        raise ValueError("boom")  # a failure may come before the trial's peak
    assert trial.user_attrs[packing.MEMORY_ATTR]["peak"] == 3 * GiB
    assert not gpu_share.measured(tmp_path, "0")
    pruned, _ = _memory(tmp_path, 16, monkeypatch)
    with pytest.raises(optuna.TrialPruned), pruned:
        raise optuna.TrialPruned("epoch 1")
    assert gpu_share.measured(tmp_path, "0")


def test_the_cuda_probe_records_nothing_for_a_trial_that_never_used_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.delenv(packing.FAKE_VAR, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    trial = _Trial()
    memory = gpu_share.TrialMemory(_job(tmp_path), trial)
    assert isinstance(memory.probe, gpu_share.CudaProbe)
    with memory:
        pass
    assert trial.user_attrs == {} and not torch.cuda.is_initialized()
