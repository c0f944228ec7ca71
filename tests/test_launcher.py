from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import cli, tiny_spec, wait_until, write_spec
from lightstudy.errors import LightstudyError
from lightstudy.launcher import Slot, added_slots, can_fork, detect_gpus, plan_slots

TESTS = str(Path(__file__).parent)
# The tests folder first (its test models, and this module for the warm process's targets).
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)}


def test_one_worker_per_gpu_pinned() -> None:
    slots = plan_slots("0,1,2,3", None, cpu_count=16)
    assert [s.gpu for s in slots] == ["0", "1", "2", "3"]
    env = slots[2].env({"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert env["OMP_NUM_THREADS"] == "4"


def test_trials_per_gpu_packs_workers_on_each_gpu() -> None:
    slots = plan_slots("0,1", None, trials_per_gpu=2, cpu_count=8)
    assert [s.gpu for s in slots] == ["0", "0", "1", "1"]
    assert all(s.threads == 2 for s in slots)


def test_auto_uses_detected_gpus_or_falls_back_to_cpu() -> None:
    assert [s.gpu for s in plan_slots("auto", None, detected=["0", "1"], cpu_count=4)] == ["0", "1"]
    assert [s.gpu for s in plan_slots(None, None, detected=["5"], cpu_count=4)] == ["5"]
    assert plan_slots("auto", None, detected=[], cpu_count=4) == [Slot(0, None, 4)]


def test_cpu_workers_split_threads_and_hide_gpus() -> None:
    slots = plan_slots(None, 2, cpu_count=2, detected=["0"])
    assert [(s.gpu, s.threads) for s in slots] == [(None, 1), (None, 1)]
    assert slots[0].env({})["CUDA_VISIBLE_DEVICES"] == ""
    assert [s.threads for s in plan_slots(None, 4, cpu_count=2)] == [1, 1, 1, 1]
    assert [s.threads for s in plan_slots(None, 2, cpu_count=2, threads=3)] == [3, 3]  # run --threads 3
    assert [s.threads for s in plan_slots("0,1", None, cpu_count=8, threads=1)] == [1, 1]
    # GPU packing's added workers: the same --threads, or the cores split between all of them
    one = plan_slots("0", None, cpu_count=8, threads=1)
    assert added_slots(one, "0", 2, threads=1, cpu_count=8) == [Slot(1, "0", 1), Slot(2, "0", 1)]
    assert [s.threads for s in added_slots(plan_slots("0", None, cpu_count=8), "0", 3, cpu_count=8)] == [2, 2, 2]


@pytest.mark.parametrize("gpus", ["a,b", "0,0", "1;2"])
def test_malformed_gpus_are_refused(gpus: str) -> None:
    with pytest.raises(LightstudyError, match="--gpus"):
        plan_slots(gpus, None)


def test_counts_must_be_positive() -> None:
    with pytest.raises(LightstudyError, match="--workers"):
        plan_slots(None, 0)
    with pytest.raises(LightstudyError, match="--trials-per-gpu"):
        plan_slots("0", None, trials_per_gpu=0)
    with pytest.raises(LightstudyError, match="--threads"):
        plan_slots(None, 2, threads=0)


# Run in a fresh interpreter: forking the test runner's process (it has threads) is what
# can_fork refuses. Three workers forked as `lightstudy run` forks its own (launched_probe.py
# stands in for lightstudy.launched); what each printed is in its log.
_FORK_DRIVER = """
import atexit, json, os, signal, subprocess, sys
from lightstudy.launcher import ForkedWorker, can_fork
atexit.register(print, "driver atexit")
print("pending output", end="")  # not flushed yet: a child must not write it again
logs = sys.argv[1]
out = {"can_fork": can_fork()}
procs = []
for i, args in enumerate([["0"], ["3"], ["term"]]):
    with open(os.path.join(logs, f"w{i}.log"), "ab") as log:
        inherited = [fd for p in procs for fd in p.fds()]
        procs.append(ForkedWorker(args, {"PROBE": f"p{i}"}, log.fileno(), inherited, module="launched_probe"))
procs[0].stdin.close()  # cancelled: it sees the end of its stdin though w1 and w2 were forked after it
out["cancelled"] = procs[0].wait(60)
try:
    procs[1].wait(0.2)
except subprocess.TimeoutExpired:
    out["still_waiting"] = procs[1].poll() is None
procs[1].stdin.write(b"go\\n")
procs[1].stdin.close()
out["go"] = procs[1].wait(60)
procs[2].send_signal(signal.SIGTERM)
out["terminated"] = procs[2].wait(60)
out["returncodes"] = [p.returncode for p in procs]
print()
print(json.dumps(out))
"""


def test_forked_workers_behave_as_spawned_ones(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FORK_DRIVER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **ENV},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "pending output" and lines[2] == "driver atexit", done.stdout
    out = json.loads(lines[1])
    assert out == {
        "can_fork": True,
        "cancelled": 0,
        "still_waiting": True,
        "go": 3,
        "terminated": -signal.SIGTERM,
        "returncodes": [0, 3, -signal.SIGTERM],
    }
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(3)]
    assert logs[0] == "line='' probe=p0 own_session=True\nprobe atexit\n"
    assert logs[1] == "line='go' probe=p1 own_session=True\nprobe atexit\n"
    assert "driver atexit" not in "".join(logs) and "pending output" not in "".join(logs)


def test_a_process_with_threads_spawns_its_workers() -> None:
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not can_fork()
    finally:
        stop.set()
        thread.join()


def test_detect_respects_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert detect_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []


# --- the warm process the workers of one `lightstudy run` share -------------------------------


def _parents(run_dir: Path) -> dict[int, int]:
    """Trial number -> the parent pid its trial.log reports (the warm process that forked it)."""
    out = {}
    for log in sorted(run_dir.glob("trials/*/trial.log")):
        for line in log.read_text().splitlines():
            if m := re.match(r"trial (\d+) of study .*, pid \d+, parent (\d+)", line):
                out[int(m.group(1))] = int(m.group(2))
    return out


def _quick(doc: dict[str, Any]) -> dict[str, Any]:
    doc["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    return doc


def test_in_jupyter_the_live_bar_is_redrawn_only_between_the_runs_own_lines() -> None:
    """rich's refresh thread redraws a Jupyter bar inside its ipywidgets Output context, where a
    trial's line printed meanwhile is captured and cleared by the next redraw (CI: a notebook
    showed "trial 1 complete" without trial 0's line); there the watch loop redraws it itself."""
    from rich.console import Console

    from lightstudy.launcher import progress_bar

    assert progress_bar(Console(force_jupyter=True)).live.auto_refresh is False
    assert progress_bar(Console(force_terminal=True, force_jupyter=False)).live.auto_refresh is True


def test_the_workers_of_a_run_share_one_warm_process(tmp_path: Path) -> None:
    import optuna

    spec = write_spec(tmp_path / "s.yaml", _quick(tiny_spec("shared", n_trials=4)))
    done = cli("run", str(spec), "--workers", "2", cwd=tmp_path, env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "runs" / "shared"
    trials = optuna.load_study(study_name="shared", storage=f"sqlite:///{run_dir / 'study.db'}").trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 4
    workers = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials}
    assert len(workers) == 2, workers  # both workers ran trials...
    parents = set(_parents(run_dir).values())
    assert len(parents) == 1, parents  # ...all forked by one process
    assert not parents & workers  # the warm process, not a worker
    assert (run_dir / "workers" / "warm.log").exists()
    with pytest.raises(ProcessLookupError):  # stopped with the run
        os.kill(parents.pop(), 0)


@pytest.mark.slow(seconds=25)
def test_the_workers_of_one_process_share_its_warm_process_until_a_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process workers (a notebook, a script) keep this process's warm process for the next
    study; an edited model module, or another sys.path, gets a new one: never the old code."""
    from lightstudy.spec import spec_from_dict
    from lightstudy.study import create_study
    from lightstudy.warmserver import stop_shared
    from lightstudy.worker import Worker

    folder = tmp_path / "mine"
    folder.mkdir()
    module = folder / "my_models_shared.py"
    module.write_text("from lightstudy.examples import ConvNet as Net\n")
    monkeypatch.syspath_prepend(str(folder))
    url = f"sqlite:///{tmp_path / 'study.db'}"

    def parent_of(name: str) -> int:
        doc = _quick(tiny_spec(name, n_trials=1))
        doc["model"]["class_path"] = "my_models_shared.Net"
        create_study(spec_from_dict(doc), url)
        report = Worker(url, name, run_dir=tmp_path / name, threads=1).run()
        assert report.complete == 1, report
        return _parents(tmp_path / name)[0]

    try:
        first = parent_of("a")
        assert parent_of("b") == first  # the second study: the same warm process, already warm
        os.utime(module, ns=(module.stat().st_atime_ns, module.stat().st_mtime_ns + 1_000_000_000))
        edited = parent_of("c")
        assert edited != first  # the module changed: a new warm process imported it again ...
        with pytest.raises(ProcessLookupError):  # ... and the old one is gone
            os.kill(first, 0)
        monkeypatch.syspath_prepend(str(tmp_path))
        assert parent_of("d") != edited  # another sys.path: a name could mean another module
    finally:
        stop_shared()


def test_run_checks_the_spec_in_the_warm_process_with_validates_error_and_no_torch_here(tmp_path: Path) -> None:
    doc = tiny_spec("bad")
    doc["model"]["init_args"]["no_such_arg"] = 1
    spec = write_spec(tmp_path / "bad.yaml", doc)
    # lightstudy.run (what `lightstudy run` calls) in a process without torch, as a notebook may
    # be: the warm process's check raises the SpecError the in-process check does (it raised a
    # bare LightstudyError, so `except lightstudy.SpecError` missed it).
    probe = (
        "import atexit, sys, lightstudy\n"
        "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr))\n"
        "try:\n"
        "    lightstudy.run(sys.argv[1], workers=1)\n"
        "except lightstudy.SpecError as e:\n"
        "    print(f'{type(e).__name__} at {e.key}', file=sys.stderr)\n"
        "    print(f'error: {e}', file=sys.stderr)\n"
        "    raise SystemExit(2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(spec)],
        cwd=tmp_path,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "torch imported: False" in done.stderr, done.stderr
    assert "SpecError at model.init_args" in done.stderr, done.stderr
    validated = cli("validate", str(spec), cwd=tmp_path, env=ENV)
    assert validated.returncode == 2
    error = [line for line in validated.stderr.splitlines() if "no_such_arg" in line]
    assert error and error[0] in done.stderr, (validated.stderr, done.stderr)
    assert not (tmp_path / "runs" / "bad").exists()  # nothing created for a spec that fails


def _tell_parent(conn: Any) -> None:
    conn.send(os.getppid())


def test_a_crashing_trial_process_leaves_the_warm_process_serving(tmp_path: Path) -> None:
    from lightstudy.spec import spec_from_dict
    from lightstudy.warmserver import WarmContext, start_warm

    warm = start_warm(spec_from_dict(tiny_spec("crash")), env={**os.environ, **ENV})
    try:
        warm.ready()
        ctx = WarmContext(warm.address)
        crash = ctx.Process(target=os.abort)
        crash.start()
        crash.join(60)
        assert crash.exitcode == -signal.SIGABRT
        exits = ctx.Process(target=os._exit, args=(3,))
        exits.start()
        exits.join(60)
        assert exits.exitcode == 3
        ours, theirs = ctx.Pipe()
        child = ctx.Process(target=_tell_parent, args=(theirs,))
        child.start()
        theirs.close()
        assert ours.poll(60)
        assert ours.recv() == warm.pid  # forked by the warm process, which outlived the crashes
        child.join(60)
        assert child.exitcode == 0 and warm.alive()
        for p in (crash, exits, child):
            p.close()
    finally:
        assert warm.stop() == 0
    assert not Path(warm.address).exists()


def test_a_worker_on_its_own_starts_and_stops_its_own_warm_process(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", _quick(tiny_spec("alone", n_trials=1)))
    assert cli("create", str(spec), cwd=tmp_path, env=ENV).returncode == 0
    done = cli("worker", "--study", "alone", "--run-dir", "runs/alone", cwd=tmp_path, env=ENV)
    assert done.returncode == 0, done.stderr
    parents = _parents(tmp_path / "runs" / "alone")
    assert list(parents) == [0]
    with pytest.raises(ProcessLookupError):
        os.kill(parents[0], 0)


def test_sigterm_of_the_launcher_hands_the_trials_back_and_stops_everything(tmp_path: Path) -> None:
    import optuna

    doc = tiny_spec("stopped", n_trials=4, max_epochs=50)
    doc["model"]["class_path"] = "lightstudy_testing_models.SlowNet"
    doc["model"]["init_args"]["step_sleep"] = 0.05
    spec = write_spec(tmp_path / "s.yaml", doc)
    run_dir = tmp_path / "runs" / "stopped"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "lightstudy", "run", str(spec), "--workers", "2"],
        cwd=tmp_path,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run_dir.mkdir(parents=True)

        def both_training() -> bool:  # each trial reported an epoch (through its worker, into the database)
            try:
                trials = optuna.load_study(study_name="stopped", storage=f"sqlite:///{run_dir / 'study.db'}").trials
            except KeyError:  # the database is there before the study is
                return False
            return sum(1 for t in trials if t.intermediate_values) >= 2

        wait_until(both_training, timeout=300, what="both trials reporting an epoch", proc=launcher)
        parents = set(_parents(run_dir).values())
        launcher.send_signal(signal.SIGTERM)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out
    trials = optuna.load_study(study_name="stopped", storage=f"sqlite:///{run_dir / 'study.db'}").trials
    handed = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(handed) == 2, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert sum(1 for t in trials if t.state.name == "WAITING") == 2  # queued for the next run
    assert len(parents) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(parents.pop(), 0)
    assert not any(t.state.name == "RUNNING" for t in trials)
