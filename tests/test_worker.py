from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import TrialState

from conftest import PrivateServer, tiny_spec, wait_until, warm_for_workers
from lightstudy.spec import spec_from_dict
from lightstudy.study import create_study, load_study, retried_numbers
from lightstudy.summary import CONFIG_ATTR, recorded_config
from lightstudy.worker import Worker

TESTS = str(Path(__file__).parent)
# The tests folder (its test models) first, then what this process imports lightstudy from.
PYTHONPATH = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)


def _slow(doc: dict[str, Any], step_sleep: float = 0.02, epochs: int = 6) -> dict[str, Any]:
    doc["model"]["class_path"] = "lightstudy_testing_models.SlowNet"
    doc["model"]["init_args"]["step_sleep"] = step_sleep
    doc["trainer"]["max_epochs"] = epochs
    return doc


def test_worker_runs_the_study_to_its_budget(tmp_path: Path, sqlite_url: str) -> None:
    create_study(spec_from_dict(tiny_spec(n_trials=3)), sqlite_url)
    report = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1).run()
    assert (report.complete, report.failed) == (3, 0)
    study, _ = load_study(sqlite_url, "tiny")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # local files gone once stored
    assert len(list((tmp_path / "run" / "artifacts").iterdir())) == 2  # keep: 2
    for t in trials:
        assert t.user_attrs["seed"] == t.number  # study seed 0 + trial number
        assert t.user_attrs["trial_dir"] == f"trials/trial-{t.number:04d}"
    # A second worker on a finished study exits at once.
    assert Worker(sqlite_url, "tiny", run_dir=tmp_path / "run").run().total == 0


def test_a_worker_waiting_on_others_trials_looks_again_soon_then_every_poll_interval(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last trials of a study often end together: a worker with nothing to claim looks
    again after 0.1 s, doubling up to ``poll_interval``, not a whole interval after the end."""
    from lightstudy.study import claim_trial

    create_study(spec_from_dict(tiny_spec(n_trials=1)), sqlite_url)
    study, spec = load_study(sqlite_url, "tiny")
    other, _ = claim_trial(study, spec)  # another worker's running trial: the budget is used
    assert other is not None
    waits: list[float] = []

    def sleep(self: Worker, seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 6:
            study.tell(other, 0.5)  # the other trial ends: the next look finds the study done

    monkeypatch.setattr(Worker, "_sleep", sleep)
    report = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", poll_interval=1.0).run()
    assert report.total == 0
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_a_trial_process_exits_while_its_outcome_is_recorded_and_is_reaped_by_the_next_trial(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker tells the outcome without waiting for the process that sent it to exit (its
    teardown overlaps the tell); it is reaped by the time the next trial has run (run_processes
    waits for it before it starts one), and none is left when the worker ends."""
    import lightstudy.ranks

    create_study(spec_from_dict(tiny_spec(n_trials=2, max_epochs=1)), sqlite_url)
    worker = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1)
    finishing: list[list[int]] = []
    real_finish = Worker._finish

    def finish(self: Worker, *args: Any, **kwargs: Any) -> None:
        finishing.append([r.process.pid for r in self._exiting])
        real_finish(self, *args, **kwargs)

    started: list[list[int]] = []
    real_run = lightstudy.ranks.run_processes

    gone_before: list[bool] = []

    def run_processes(*args: Any, **kwargs: Any) -> Any:
        exiting = kwargs["exiting"]
        previous = [r.process.pid for r in exiting]
        outcome = real_run(*args, **kwargs)
        started.append([r.process.pid for r in exiting])
        for pid in previous:  # the last trial's process
            try:
                os.kill(pid, 0)
                gone_before.append(False)
            except ProcessLookupError:
                gone_before.append(True)
        return outcome

    monkeypatch.setattr(Worker, "_finish", finish)
    monkeypatch.setattr("lightstudy.worker.run_processes", run_processes)
    assert worker.run().complete == 2
    assert [len(pids) for pids in finishing] == [1, 1]  # each told while its process was left to exit
    assert finishing == started and finishing[0] != finishing[1]
    assert gone_before == [True]
    assert worker._exiting == []
    for pid in [p for pids in finishing for p in pids]:  # reaped (the warm process said it exited)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_killed_trial_process_fails_is_retried_and_resumes(tmp_path: Path, sqlite_url: str) -> None:
    create_study(spec_from_dict(_slow(tiny_spec(n_trials=1))), sqlite_url)
    worker = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1)
    last = tmp_path / "run" / "trials" / "trial-0000" / "checkpoints" / "last.ckpt"
    killed: list[int] = []

    def kill_once_checkpointed() -> None:
        wait_until(lambda: last.exists() and bool(worker._children))  # last.ckpt appears whole (an atomic rename)
        [child] = worker._children
        killed.append(child.pid)
        os.kill(child.pid, signal.SIGKILL)

    thread = threading.Thread(target=kill_once_checkpointed)
    thread.start()
    report = worker.run()
    thread.join()
    assert killed
    assert (report.failed, report.complete) == (1, 1)
    study, _ = load_study(sqlite_url, "tiny")
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL
    assert "killed by SIGKILL" in first.user_attrs["fail_reason"]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == first.params
    assert retry.user_attrs["resumed_from"]["trial"] == 0
    assert retry.user_attrs["resumed_from"]["epoch"] >= 0
    assert set(first.intermediate_values) <= set(retry.intermediate_values)  # curves continue
    log = (tmp_path / "run" / "trials" / "trial-0000" / "trial.log").read_text()
    starts = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if line.startswith("training starts at epoch")]
    assert starts[0] == 0 and starts[-1] > 0, log


def test_trial_timeout_fails_the_trial_and_the_worker_goes_on(tmp_path: Path, sqlite_url: str) -> None:
    doc = _slow(tiny_spec(n_trials=2, trial_timeout=3), step_sleep=0.5, epochs=50)
    create_study(spec_from_dict(doc), sqlite_url)
    report = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1).run()
    assert report.failed == 2
    study, _ = load_study(sqlite_url, "tiny")
    for t in study.get_trials():
        assert t.state == TrialState.FAIL
        assert "trial_timeout" in t.user_attrs["fail_reason"]


@pytest.mark.slow
def test_sigterm_hands_the_trial_back_and_exits_zero(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_study(spec_from_dict(_slow(tiny_spec(n_trials=1), step_sleep=0.05, epochs=8)), url)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "LIGHTSTUDY_STORAGE": url, "PYTHONUNBUFFERED": "1"}
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightstudy",
            "worker",
            "--study",
            "tiny",
            "--run-dir",
            str(tmp_path / "run"),
            "--threads",
            "1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = tmp_path / "run" / "trials" / "trial-0000" / "checkpoints" / "last.ckpt"
    wait_until(lambda: last.exists())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    study, _ = load_study(url, "tiny")
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["interrupted"] is True
    assert retry.state == TrialState.WAITING
    # Another worker (in this process: one interpreter start less) finishes it, from the saved checkpoint.
    assert Worker(url, "tiny", run_dir=tmp_path / "run", threads=1).run().complete == 1
    study, _ = load_study(url, "tiny")
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.get_trials()[1].user_attrs["resumed_from"]["trial"] == 0


def _run_worker_subprocess(
    url: str, run_dir: Path | None, env: dict[str, str] | None = None, log: Path | None = None, cwd: Path | None = None
) -> Any:
    """A ``lightstudy worker`` process (no ``--run-dir`` where ``run_dir`` is None, as a worker
    started by hand in ``cwd``); its output is piped, or written to ``log`` as it runs."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "LIGHTSTUDY_STORAGE": url, "PYTHONUNBUFFERED": "1", **(env or {})}
    folder = [] if run_dir is None else ["--run-dir", str(run_dir)]
    return subprocess.Popen(
        [sys.executable, "-m", "lightstudy", "worker", "--study", "tiny", *folder, "--threads", "1"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE if log is None else log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_kill_9_of_a_worker_is_reaped_retried_and_resumed(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    doc = _slow(tiny_spec(n_trials=2), step_sleep=0.03, epochs=6)
    create_study(spec_from_dict(doc), url)
    run_dir = tmp_path / "run"
    victim = _run_worker_subprocess(url, run_dir)
    last = run_dir / "trials" / "trial-0000" / "checkpoints" / "last.ckpt"
    wait_until(lambda: last.exists())
    victim.kill()  # kill -9 of the worker: its trial process dies with it
    victim.wait()
    # The survivor runs in this process (one interpreter start less; a worker all the same).
    assert Worker(url, "tiny", run_dir=run_dir, threads=1).run().failed == 0
    study, _ = load_study(url, "tiny")
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    resumed = [t for t in trials if t.user_attrs.get("resumed_from")]
    assert resumed and resumed[0].user_attrs["resumed_from"]["trial"] == 0
    log = (run_dir / "trials" / "trial-0000" / "trial.log").read_text()
    assert any(line.startswith("training starts at epoch") and not line.endswith(" 0") for line in log.splitlines()), (
        log
    )


def _tiny_fast(n_trials: int, **study: Any) -> dict[str, Any]:
    doc = tiny_spec(n_trials=n_trials, **study)
    doc["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    return doc


def _workers(
    url: str, run_dir: Path | None, n: int, cwd: Path | None = None, env: dict[str, str] | None = None
) -> list[Any]:
    return [_run_worker_subprocess(url, run_dir, env=env, cwd=cwd) for _ in range(n)]


@pytest.mark.slow(seconds=50)
@pytest.mark.parametrize(("backend", "n_workers"), [("sqlite", 4), ("postgres", 8)])
def test_many_workers_one_study_no_duplicates_no_locks(
    backend: str, n_workers: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    n_trials = 16  # two or more a worker: enough to collide on every claim
    doc = _tiny_fast(n_trials, grace_period=60, heartbeat_interval=5)
    create_study(spec_from_dict(doc), url)
    # On SQLite the workers are started as a user starts them by hand in a folder: the storage
    # from LIGHTSTUDY_STORAGE, no --run-dir (test_cli's two hand-started workers were this test).
    # Both share one warm process, as the workers of `lightstudy run` do (a worker that starts its
    # own is the kill -9 tests' and bench/scaling's): the claims collide the same, and 4 or 8
    # torch imports on 2 cores would only delay the first claims.
    with warm_for_workers(doc) as warm_env:
        procs = (
            _workers(url, tmp_path / "run", n_workers, env=warm_env)
            if backend == "postgres"
            else _workers(url, None, n_workers, tmp_path, env=warm_env)
        )
        outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n_workers, outs
    for out in outs:
        assert "locked" not in out and "deadlock" not in out.lower(), out
        assert "Traceback" not in out, out
    study, _ = load_study(url, "tiny")
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(n_trials))  # no number twice, none lost
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) > 1


@pytest.mark.slow
def test_postgres_restart_during_a_study_costs_no_trial(private_postgres: PrivateServer, tmp_path: Path) -> None:
    pg_url = private_postgres.url
    doc = _slow(tiny_spec(n_trials=6, grace_period=60, heartbeat_interval=2), step_sleep=0.02, epochs=3)
    create_study(spec_from_dict(doc), pg_url)
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    with warm_for_workers(doc) as warm_env:  # the two workers share one, as under `lightstudy run`
        procs = [_run_worker_subprocess(pg_url, tmp_path / "run", env=warm_env, log=log) for log in logs]
        study, _ = load_study(pg_url, "tiny")
        wait_until(lambda: len([t for t in study.get_trials() if t.state == TrialState.COMPLETE]) >= 2, timeout=300)
        private_postgres.stop()  # the server goes away (fast shutdown: sessions cut) ...

        def noticed() -> bool:  # ... and stays away until a worker has met the outage (a heartbeat, a claim)
            text = "".join(p.read_text() for p in [*logs, *(tmp_path / "run").rglob("trial.log")])
            return "database unavailable" in text or "heartbeat of trial" in text

        wait_until(noticed, timeout=120)
        private_postgres.start()
        for p in procs:
            p.wait(timeout=600)
    outs = [log.read_text() for log in logs]
    failing = "\n=====\n".join(out[-4000:] for p, out in zip(procs, outs) if p.returncode != 0)
    assert [p.returncode for p in procs] == [0, 0], failing
    study, _ = load_study(pg_url, "tiny")
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == 6, [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    # A claim cut in half by the restart is handed back and retried: it costs no trial.
    assert {t.number for t in failed} <= retried_numbers(trials)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_pruning_goes_through_the_worker(tmp_path: Path, sqlite_url: str) -> None:
    """A one-device trial process asks the worker (over its pipe) to report and to decide pruning."""
    doc = tiny_spec(n_trials=2, pruner={"name": "ThresholdPruner", "lower": 2.0})  # prunes at epoch 0
    create_study(spec_from_dict(doc), sqlite_url)
    report = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1).run()
    assert report.pruned == 2
    study, _ = load_study(sqlite_url, "tiny")
    for t in study.get_trials():
        assert t.state == TrialState.PRUNED
        assert list(t.intermediate_values) == [0]
        assert recorded_config(t)["trainer"]["max_epochs"] == 2  # attrs came over the pipe too
        assert "config" not in t.user_attrs and t.system_attrs[CONFIG_ATTR] == recorded_config(t)  # system attr too


def test_a_tell_cut_off_after_its_commit_is_not_told_twice(tmp_path: Path, sqlite_url: str, monkeypatch: Any) -> None:
    """The database commits the tell, then the connection breaks: the retry must not fail the worker."""
    import optuna
    import sqlalchemy.exc

    create_study(spec_from_dict(tiny_spec(n_trials=1)), sqlite_url)
    worker = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1)
    real_tell = optuna.Study.tell
    cuts = []

    def tell_then_break(self: optuna.Study, *args: Any, **kwargs: Any) -> Any:
        result = real_tell(self, *args, **kwargs)
        if not cuts:
            cuts.append(1)
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return result

    monkeypatch.setattr(optuna.Study, "tell", tell_then_break)
    report = worker.run()
    assert cuts and report.complete == 1 and report.failed == 0
    study, _ = load_study(sqlite_url, "tiny")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_a_trial_failed_as_stale_meanwhile_is_not_retried_twice(tmp_path: Path, sqlite_url: str) -> None:
    from optuna.exceptions import UpdateFinishedTrialError

    create_study(spec_from_dict(tiny_spec(n_trials=1)), sqlite_url)
    worker = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1)
    study, _ = load_study(sqlite_url, "tiny")
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)  # what the reaper does to a trial whose heartbeat stopped
    with pytest.raises(UpdateFinishedTrialError):
        worker._tell(trial, TrialState.COMPLETE, [0.5])


def test_a_nop_pruner_by_class_path_asks_no_pruning_question(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trial.py compared the pruner's name with "NopPruner", so `optuna.pruners.NopPruner` (a
    form the spec accepts) made every epoch wait on a pruning answer from the worker."""
    import lightstudy.worker as worker_module

    asked: list[str] = []
    answer = worker_module._answer

    def counting(db: Any, trial: Any) -> Any:
        handle = answer(db, trial)

        def recorded(message: Any) -> Any:
            asked.append(type(message).__name__)
            return handle(message)

        recorded.flush = handle.flush  # type: ignore[attr-defined]
        return recorded

    monkeypatch.setattr(worker_module, "_answer", counting)
    create_study(spec_from_dict(tiny_spec(n_trials=1, pruner="optuna.pruners.NopPruner")), sqlite_url)
    assert Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1).run().complete == 1
    assert asked and not [kind for kind in asked if "prune" in kind.lower()], asked


SLURM_TASK = {  # what a Slurm batch step has: Lightning, in the trial, detects Slurm from these
    "SLURM_JOB_ID": "45",
    "SLURM_JOB_NAME": "lightstudy",
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "node001",
}


@pytest.mark.parametrize(
    ("batch", "pruner", "slurm"),
    [(0, None, False), (2, "MedianPruner", False), (0, None, True), (2, None, True)],
    ids=["first-batch", "last-batch-pruned", "slurm-first-batch", "slurm-last-batch"],
)
def test_sigterm_during_validation_hands_the_trial_back(
    tmp_path: Path, batch: int, pruner: str | None, slurm: bool
) -> None:
    """A SIGTERM mid-validation met Lightning's own SIGTERM check, which failed the trial instead
    of handing it back (test_deploy slept to stay out of that window)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    gate = tmp_path / "in-validation"
    doc = tiny_spec(n_trials=1, max_epochs=4, pruner=pruner)
    doc["model"]["class_path"] = "lightstudy_testing_models.GateNet"
    doc["model"]["init_args"].update(gate=str(gate), gate_epoch=1, gate_batch=batch)
    doc["trainer"].update(limit_train_batches=2, limit_val_batches=3)
    create_study(spec_from_dict(doc), url)
    proc = _run_worker_subprocess(url, tmp_path / "run", SLURM_TASK if slurm else None)
    try:
        wait_until(gate.exists)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    study, _ = load_study(url, "tiny")
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs.get("interrupted") is True, (out, first.user_attrs)
    assert retry.state == TrialState.WAITING
    trial_log = (tmp_path / "run" / "trials" / "trial-0000" / "trial.log").read_text()
    assert "stopped by signal" in trial_log


def test_a_signal_before_the_trial_process_starts_hands_the_trial_back(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM between the claim and the trial process's start found no process to pass it to,
    and the trial then trained to its end."""
    create_study(spec_from_dict(tiny_spec(n_trials=2)), sqlite_url)
    worker = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1)
    set_attrs = worker._set_attrs

    def signalled(trial: Any, attrs: dict[str, Any]) -> None:
        set_attrs(trial, attrs)
        if not worker._signals:
            os.kill(os.getpid(), signal.SIGTERM)  # the worker's own handler (run installs it)

    monkeypatch.setattr(worker, "_set_attrs", signalled)
    report = worker.run()
    assert (report.complete, report.interrupted) == (0, 1)
    study, _ = load_study(sqlite_url, "tiny")
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["interrupted"] is True
    assert retry.state == TrialState.WAITING
    assert not (tmp_path / "run" / "trials" / "trial-0000" / "trial.log").exists()  # never started


MARKING_CLI = """
import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI


class MarkingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        Path(os.environ["MARK"]).write_text("parsed")
        parser.link_arguments("data.init_args.batch_size", "model.init_args.hidden")
"""


def test_a_warm_process_whose_starter_is_gone_before_it_is_ready_stops_quietly() -> None:
    """A worker killed while its warm process imports (chaos: SIGKILL of a starting worker) left
    a BrokenPipeError traceback in its log: telling the starter now says whether it listens."""
    import contextlib
    import json

    from lightstudy._warm import _verdict

    read, write = os.pipe()
    os.close(read)
    gone = os.fdopen(write, "w")
    assert _verdict(gone, ok=True, pid=1) is False
    with contextlib.suppress(BrokenPipeError):
        gone.close()
    read, write = os.pipe()
    with os.fdopen(write, "w") as there:
        assert _verdict(there, ok=True, pid=1) is True
    with os.fdopen(read) as said:
        assert json.loads(said.read()) == {"ok": True, "pid": 1}


def test_the_warm_process_logs_its_stages_and_parses_with_the_study_cli(tmp_path: Path) -> None:
    """What a warm process does before it forks trials: imports, the study's config through its
    own cli: class (before it says it is ready), then the warm-up trial once idle; all logged."""
    from lightstudy.warmserver import start_warm

    (tmp_path / "my_cli.py").write_text(MARKING_CLI)
    # What Python runs at an ordinary exit (atexit, then freeing every module: ~1.3 s with torch
    # and Lightning) is skipped: its stop is not waited for. The log is flushed all the same.
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, os\natexit.register(lambda: open(os.environ['TEARDOWN'], 'a').write(f'{os.getpid()}\\n'))\n"
    )
    doc = tiny_spec("warmed")
    doc["cli"] = "my_cli.MarkingCLI"
    doc["model"]["init_args"].pop("hidden")
    mark = tmp_path / "mark"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join((str(tmp_path), PYTHONPATH)),
        "LIGHTSTUDY_VERBOSE": "1",
        "MARK": str(mark),
        "TEARDOWN": str(tmp_path / "teardown"),
    }
    log = tmp_path / "warm.log"
    warm = start_warm(spec_from_dict(doc), log=log, env=env)
    try:
        seconds = warm.ready()
        assert mark.read_text() == "parsed"  # the study's own cli: class parsed its config
        assert set(seconds) == {"import", "study config"}, seconds
        # idle: the warm-up trial ran
        wait_until(lambda: "warm-up: trial path" in log.read_text(), what="the warm-up trial in warm.log")
        text = log.read_text()
        assert f"warm process {warm.pid} ready" in text and "failed" not in text, text
    finally:
        assert warm.stop() == 0
    assert log.read_text().endswith("its starter is gone; stopping\n")
    tore_down = (tmp_path / "teardown").read_text().split() if (tmp_path / "teardown").exists() else []
    assert str(warm.pid) not in tore_down  # (a `python -c` it starts while warming up exits as usual)
    # A study config that cannot be parsed is a logged warning, never a failed warm process.
    log = tmp_path / "warm2.log"
    warm = start_warm(spec_from_dict({**doc, "cli": "my_cli.NoSuchCLI"}), log=log, env=env)
    try:
        assert "study config" not in warm.ready()
        assert "warm-up: the study config failed, trials start cold" in log.read_text()
    finally:
        warm.stop()


def test_each_told_trial_gets_its_dashboard_note_and_a_failed_note_fails_nothing(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import optuna
    from optuna_dashboard import get_note

    import lightstudy.dashboard
    from lightstudy.storage.boundary import trial_id

    create_study(spec_from_dict(tiny_spec(n_trials=2, max_epochs=1)), sqlite_url)
    real = lightstudy.dashboard.write_trial_note
    calls: list[int] = []

    def first_fails(study: Any, spec: Any, number: int, **known: Any) -> str:
        calls.append(number)
        if len(calls) == 1:
            raise RuntimeError("the dashboard's storage said no")
        return real(study, spec, number, **known)

    monkeypatch.setattr(lightstudy.dashboard, "write_trial_note", first_fails)
    report = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1).run()
    assert (report.complete, report.failed) == (2, 0)  # the failed note failed no trial
    assert calls == [0, 1]
    assert "trial 0: could not write its dashboard note (the dashboard's storage said no)" in caplog.text
    study, _ = load_study(sqlite_url, "tiny")
    first, second = study.get_trials()
    assert get_note(optuna.trial.Trial(study, trial_id(first))) == ""
    note = get_note(optuna.trial.Trial(study, trial_id(second)))
    assert note.startswith("## Trial 1: complete"), note
    assert "`model.init_args.lr` = " in note


def test_writing_a_note_imports_no_dashboard_app_and_the_dashboard_reads_it(tmp_path: Path, sqlite_url: str) -> None:
    """A worker writes each trial's note with optuna-dashboard's own notes module, loaded alone:
    the package's __init__ (its web app, optuna.importance, scikit-learn, SciPy: 1.7 s of CPU in
    every worker) is not imported, and the dashboard, imported afterwards, reads the note."""
    import subprocess
    import sys

    create_study(spec_from_dict(tiny_spec(n_trials=1)), sqlite_url)
    code = f"""
import sys
import optuna
from lightstudy.dashboard import write_trial_note
from lightstudy.storage.boundary import trial_id
from lightstudy.study import load_study

study, spec = load_study({sqlite_url!r}, "tiny")
dist = optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)
study.add_trial(optuna.trial.create_trial(value=0.5, params={{"model.init_args.lr": 0.01}},
                                          distributions={{"model.init_args.lr": dist}}))
body = write_trial_note(study, spec, 0)
heavy = sorted(m for m in ("optuna_dashboard", "optuna_dashboard._app", "sklearn", "scipy") if m in sys.modules)
print("heavy:", heavy)
from optuna_dashboard import _note, get_note, save_note  # the package, as its app imports its notes
assert save_note is _note.save_note is sys.modules["optuna_dashboard._note"].save_note
trial = study.get_trials()[0]
assert get_note(optuna.trial.Trial(study, trial_id(trial))) == body, body
print("read back:", body.splitlines()[0])
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "heavy: []" in done.stdout, done.stdout
    assert "read back: ## Trial 0: complete" in done.stdout, done.stdout


def test_a_note_says_removed_once_retention_removes_the_checkpoint(tmp_path: Path, sqlite_url: str) -> None:
    """Trials 0 and 1 each enter the top 1 and are pushed out by the next (val_acc = lr, rising):
    their notes, written as "kept", are rewritten as "removed"; trial 2's says kept."""
    import optuna
    from optuna_dashboard import get_note

    from lightstudy.storage.boundary import trial_id

    rising = [{"model.init_args.lr": lr, "data.init_args.batch_size": 64} for lr in (0.001, 0.002, 0.003)]
    doc = tiny_spec(n_trials=3, max_epochs=1, checkpoints={"keep": 1}, enqueue=rising)
    doc["model"]["class_path"] = "lightstudy_testing_models.LrNet"
    doc["trainer"].update(limit_train_batches=1, limit_val_batches=1)
    create_study(spec_from_dict(doc), sqlite_url)
    assert Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1).run().complete == 3
    study, _ = load_study(sqlite_url, "tiny")
    notes = [get_note(optuna.trial.Trial(study, trial_id(t))) for t in study.get_trials()]
    assert ["**Checkpoint:** removed" in n for n in notes] == [True, True, False], notes
    assert "**Checkpoint:** kept" in notes[2], notes[2]


def test_the_note_of_a_trial_without_a_checkpoint_is_written_from_that_trial_alone(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Falling values with keep 1: trial 0 is kept, trials 1 and 2 store no checkpoint. Their
    notes are written without reading every trial, and say what a note from every trial says."""
    import optuna
    from optuna_dashboard import get_note

    from lightstudy.dashboard import write_trial_note
    from lightstudy.storage.boundary import trial_id

    falling = [{"model.init_args.lr": lr, "data.init_args.batch_size": 64} for lr in (0.003, 0.002, 0.001)]
    doc = tiny_spec(n_trials=3, max_epochs=1, checkpoints={"keep": 1}, enqueue=falling)
    doc["model"]["class_path"] = "lightstudy_testing_models.LrNet"
    doc["trainer"].update(limit_train_batches=1, limit_val_batches=1)
    create_study(spec_from_dict(doc), sqlite_url)
    worker = Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1)
    reads: list[int] = []
    every = optuna.Study.get_trials

    def counted(self: optuna.Study, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("states") is None:
            reads.append(1)
        return every(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "get_trials", counted)
    import lightstudy.dashboard

    notes_read: list[int] = []
    real = lightstudy.dashboard.write_trial_note

    def note(study: Any, spec: Any, number: int, **known: Any) -> str:
        before = len(reads)
        body = real(study, spec, number, **known)
        notes_read.append(len(reads) - before)
        return body

    monkeypatch.setattr(lightstudy.dashboard, "write_trial_note", note)
    assert worker.run().complete == 3
    assert notes_read == [1, 0, 0]  # trial 0's checkpoint is kept: only its note reads every trial
    monkeypatch.undo()
    study, spec = load_study(sqlite_url, "tiny")
    written = [get_note(optuna.trial.Trial(study, trial_id(t))) for t in study.get_trials()]
    assert "**Checkpoint:** kept" in written[0] and "**Checkpoint:** none kept" in written[1]
    assert written == [write_trial_note(study, spec, n) for n in range(3)]  # as from every trial
