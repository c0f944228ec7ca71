"""A chaos run: workers and trial processes killed at random while a PostgreSQL study runs.

A private PostgreSQL server (initdb in a temporary folder, on a free port) holds one study of
small digits trials that save checkpoints (the study keeps its top ``--keep``). Six ``lightstudy
worker`` processes run it for the set time while a schedule drawn from ``--seed`` sends SIGKILL
and SIGTERM to workers and to trial processes, restarts the database server once, and starts a
replacement for every worker that went. Then every worker is stopped (SIGTERM: trials handed
back), the study's budget is closed at the trials it counts (``create --update-spec``), fresh
workers drain it, and the end state is checked:

- finished / n_trials / lost: COMPLETE trials against the closed budget (every kill is retried,
  so every counted trial must finish); running: RUNNING or WAITING trials left;
- duplicates: a lineage (a trial and its retries) completed twice, or one configuration
  completed by two lineages;
- orphans: checkpoint files of finished lineages still on disk, stored checkpoints no kept
  trial references, trial folders of no trial; kept_checkpoints against keep: the top k's files;
- resumed_ok against retried: a retry whose trial process got to training continued from its
  predecessor's last checkpoint (the predecessor's newest checkpoint file when the schedule
  SIGKILLed its process, else one holding the predecessor's last reported epoch), or the
  predecessor had reported nothing to continue;
- workers: each exits 0 unless SIGKILLed, also after SIGTERM; none outlives the run.

It prints one JSON line (also appended to ``--out``) and a table, and exits 1 on any violation,
naming each. A failure replays with the same ``--seed`` (the schedule; not the timing).

    python bench/chaos.py                 # 10 minutes of chaos
    python bench/chaos.py --quick         # about 80 s in all: 45 s of chaos, 4 workers
    python bench/chaos.py --quick --minutes 0.5 --workers 2 --keep 2 --seed 1   # the test: about 65 s
    python bench/chaos.py --minutes 3 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, PrivatePostgres, digits_spec, table, write_jsonl

STUDY = "chaos"
LIGHTSTUDY = [sys.executable, "-m", "lightstudy"]
EPOCHS = 5
HEARTBEAT, GRACE = 2, 12  # seconds: a SIGKILLed worker's trial is retried GRACE s after its last beat
EVENTS = (  # what the schedule does, with its weight
    ("SIGKILL trial", 3),
    ("SIGTERM trial", 2),
    ("SIGKILL worker", 2),
    ("SIGTERM worker", 2),
)
POSTPONE = 6.0  # s an event waits for a target (a trial process, a worker) before it is dropped
QUIET_BEFORE_DB = 25.0  # no worker starts this long before the database stops (issue 16, bug (d))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/chaos.py",
        description=__doc__.strip().splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="45 s of chaos with 4 workers: checks the script")
    p.add_argument("--minutes", type=float, default=None, help="minutes of chaos (default 10; --quick 0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule (default 0)")
    p.add_argument("--workers", type=int, default=None, help="workers kept running (default 6; --quick 4)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints the study keeps (default 3)")
    p.add_argument("--out", type=Path, default=RESULTS / "chaos.jsonl", help="JSON line appended here")
    p.add_argument(
        "--keep-files",
        action="store_true",
        help="leave the run folder and worker logs (path printed; kept anyway when a check fails)",
    )
    args = p.parse_args()
    if args.minutes is None:
        args.minutes = 0.75 if args.quick else 10.0
    if args.workers is None:
        args.workers = 4 if args.quick else 6
    for name, low in (("minutes", 0.5), ("workers", 2), ("keep", 1)):
        if getattr(args, name) < low:
            print(f"bench/chaos.py: --{name} {getattr(args, name)} is too small; give at least {low}", file=sys.stderr)
            raise SystemExit(2)
    return args


# --- the schedule ---------------------------------------------------------------------------


@dataclass
class Event:
    at: float  # seconds after the first worker started
    kind: str
    pick: float  # which target, as a fraction of the sorted candidates


def schedule(seed: int, seconds: float) -> tuple[list[Event], float, float]:
    """Kills at random intervals, and when the database stops and for how long."""
    rng = random.Random(seed)
    kinds = [k for k, w in EVENTS for _ in range(w)]
    events, t = [], rng.uniform(8, 14)  # the first trials get going first
    while t < seconds - 5:
        events.append(Event(round(t, 2), rng.choice(kinds), rng.random()))
        t += rng.uniform(3, 9)
    db_at = rng.uniform(0.35, 0.6) * seconds
    return events, db_at, rng.uniform(2, 5)


# --- processes ------------------------------------------------------------------------------


def _ppids() -> dict[int, int]:
    """Every process's parent, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    return parents


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _trial_processes(worker_pid: int, parents: dict[int, int], run: Path) -> list[tuple[int, str]]:
    """The worker's trial processes and their trial folders (relative to ``run``).

    A trial process is a child of the worker's forkserver whose output goes to a ``trial.log``
    under ``run``; the forkserver has other children (a plain child of it is no trial).
    """
    servers = {pid for pid, parent in parents.items() if parent == worker_pid}
    found = []
    for pid in sorted(pid for pid, parent in parents.items() if parent in servers):
        try:
            out = Path(os.readlink(f"/proc/{pid}/fd/1"))
        except OSError:
            continue
        if out.name == "trial.log" and out.parent.is_relative_to(run):
            found.append((pid, str(out.parent.relative_to(run))))
    return found


@dataclass
class WorkerProc:
    slot: int
    proc: subprocess.Popen[bytes]
    log: Path
    started: float
    signals: list[str] = field(default_factory=list)  # what the schedule sent it
    signalled_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class Fleet:
    """The workers, started in their own sessions (so nothing they leave can outlive the run)."""

    def __init__(self, url: str, work: Path) -> None:
        self.url = url
        self.work = work
        self.count = 0
        self.live: dict[int, WorkerProc] = {}
        self.gone: list[WorkerProc] = []
        self.sessions: list[int] = []

    def start(self, slot: int) -> WorkerProc:
        self.count += 1
        log = self.work / "workers" / f"worker-{self.count:03d}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LIGHTSTUDY_STORAGE": self.url, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*LIGHTSTUDY, "worker", "--study", STUDY, "--run-dir", str(self.work / "run"), "--threads", "1"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = WorkerProc(slot, proc, log, time.monotonic())
        self.live[slot] = worker
        self.sessions.append(proc.pid)
        return worker

    def reap(self) -> list[WorkerProc]:
        """Workers that exited since the last call."""
        ended = [w for w in self.live.values() if w.proc.poll() is not None]
        for w in ended:
            del self.live[w.slot]
            self.gone.append(w)
        return ended

    def stragglers(self) -> list[int]:
        """Processes still alive in the workers' sessions (forkservers, trial processes)."""
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.getsid(int(entry)) in self.sessions and _alive(int(entry)):
                        out.append(int(entry))
        return out

    def kill_all(self) -> None:
        for sid in self.sessions:
            with contextlib.suppress(OSError):
                os.killpg(sid, signal.SIGKILL)


# --- the study ------------------------------------------------------------------------------


def _spec(n_trials: int, keep: int, seed: int) -> dict[str, Any]:
    doc = digits_spec(STUDY, n_trials=n_trials, epochs=EPOCHS, seed=seed, keep=keep)
    doc["study"].update(heartbeat_interval=HEARTBEAT, grace_period=GRACE, max_retry=1000)
    doc["trainer"].update(limit_train_batches=12, limit_val_batches=2)
    doc["model"]["init_args"] = {"channels": 4, "hidden": 16}
    return doc


def _newest_checkpoint_epoch(folder: Path) -> int | None:
    """The epoch of the newest checkpoint (by global step) in a trial folder.

    The files are read first, at once: the retry may start within milliseconds and, once it has
    finished, its worker deletes the folder's checkpoints.
    """
    import io

    import torch

    blobs = []
    for path in folder.glob("*.ckpt"):
        with contextlib.suppress(OSError):
            blobs.append(path.read_bytes())
    best: tuple[int, int] | None = None
    for blob in blobs:
        try:
            ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception:  # cut short by the kill
            continue
        key = (int(ckpt.get("global_step", -1)), int(ckpt.get("epoch", -1)))
        best = key if best is None or key > best else best
    return None if best is None else best[1]


class Chaos:
    def __init__(self, args: argparse.Namespace, server: PrivatePostgres, url: str, work: Path) -> None:
        self.args = args
        self.server = server
        self.url = url
        self.work = work
        self.fleet = Fleet(url, work)
        self.kills: dict[str, int] = {kind: 0 for kind, _ in EVENTS}
        self.skipped = 0
        self.sigterm_ignored = 0
        self.terms: dict[int, tuple[int, int]] = {}  # SIGTERMed trial -> (its worker, last step then)
        self.db_restarts = 0
        self.db_down: tuple[float, float] | None = None
        self.snapshots: dict[int, int | None] = {}  # trial number -> newest checkpoint epoch when SIGKILLed
        self.violations: list[str] = []
        self.host = socket.gethostname()
        self._study: Any = None
        self._logs: dict[int, dict[int, str]] = {}  # lineage root -> trial number -> its trial.log part
        self.t0 = time.monotonic()

    def study(self) -> Any:
        """The study as lightstudy opens it (pre-ping: survives the restart)."""
        import optuna

        from lightstudy.study import load_study

        if self._study is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._study = load_study(self.url, STUDY)[0]
        return self._study

    def trials(self, *states: Any) -> list[Any]:
        from lightstudy.storage import retry_db

        return retry_db(lambda: self.study().get_trials(deepcopy=False, states=states or None), what="read the trials")

    # the chaos phase

    def run(self) -> float:
        seconds = self.args.minutes * 60
        events, db_at, db_for = schedule(self.args.seed, seconds)
        for slot in range(self.args.workers):
            self.fleet.start(slot)
        t0 = self.t0 = time.monotonic()
        pending = list(events)
        db_done = False
        while (now := time.monotonic() - t0) < seconds:
            self._replace(now, db_at, db_done)
            if not db_done and now >= db_at:
                self._restart_db(db_for)
                db_done = True
                continue
            if pending and now >= pending[0].at and self._fire(pending[0]):
                pending.pop(0)
                continue
            time.sleep(0.1)  # the schedule's clock: nothing here waits for a condition
        return time.monotonic() - t0

    def _replace(self, now: float, db_at: float, db_done: bool) -> None:
        for w in self.fleet.reap():
            self._judge_exit(w)
        if not db_done and db_at - QUIET_BEFORE_DB <= now:
            return  # a worker starting while the database is away exits 2 (issue 16, bug (d))
        for slot in range(self.args.workers):
            if slot not in self.fleet.live:
                self.fleet.start(slot)

    def _judge_exit(self, w: WorkerProc, draining: bool = False) -> None:
        code = w.proc.returncode
        if "SIGKILL worker" in w.signals:
            return
        if code == -signal.SIGTERM and not re.search(r"trial \d+ started", w.log.read_text(errors="replace")):
            return  # SIGTERMed while it started up (before its handlers): it had claimed nothing
        if not w.signals and (code != 0 or not draining):  # the budget is open while the chaos runs
            tail = w.log.read_text(errors="replace")[-600:].strip().replace("\n", " | ")
            self.violations.append(f"worker {w.pid} exited {code} unasked: {tail}")
        elif code != 0:
            self.violations.append(f"worker {w.pid} exited {code} after SIGTERM, not 0")

    def _fire(self, event: Event) -> bool:
        """Send the event's signal; False: no target yet, try again."""
        parents = _ppids()
        workers = sorted(self.fleet.live.values(), key=lambda w: w.slot)
        workers = [w for w in workers if not w.signals]  # one signal each; a second means 'now'
        run = self.work / "run"
        if event.kind.endswith("trial"):
            targets = [(w, pid, folder) for w in workers for pid, folder in _trial_processes(w.pid, parents, run)]
        else:
            targets = [(w, w.pid, None) for w in workers]
        if not targets:  # none now (workers starting, between trials): a little later, or never
            if time.monotonic() - self.t0 - event.at < POSTPONE:
                return False
            self.skipped += 1
            return True
        worker, pid, folder = targets[min(int(event.pick * len(targets)), len(targets) - 1)]
        sig = signal.SIGKILL if event.kind.startswith("SIGKILL") else signal.SIGTERM
        running = self._running_trial(worker)
        if running is not None and folder is not None and running.user_attrs.get("trial_dir") != folder:
            running = None  # not the process of the trial the database has the worker run
        if running is not None and sig == signal.SIGTERM:
            step = max(max(running.intermediate_values, default=-1), self._logged_epoch(running))
            self.terms[running.number] = (worker.pid, step)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            self.kills[event.kind] += 1
            print(f"{time.monotonic() - self.t0:7.1f}s {event.kind} {pid} (worker {worker.pid})", flush=True)
            if event.kind.endswith("worker"):
                worker.signals.append(event.kind)
        if running is not None and event.kind == "SIGKILL trial":
            self._snapshot(pid, running.number, str(running.user_attrs["trial_dir"]))
        return True

    def _running_trial(self, worker: WorkerProc) -> Any:
        """The trial the worker runs now, if the database answers."""
        from optuna.trial import TrialState

        try:
            trials = self.study().get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception:  # the database is restarting: no snapshot for this kill
            return None
        for t in trials:
            if t.user_attrs.get("worker") == f"{self.host}:{worker.pid}" and "trial_dir" in t.user_attrs:
                return t
        return None

    def _logged_epoch(self, trial: Any) -> int:
        """The last epoch the trial's process reported, by its own part of its ``trial.log``, or -1.

        The database can be behind it: while the database is down (or just back), a report waits
        in the worker, which retries it, and a trial that already finished training is still
        RUNNING there until its tell gets through. A SIGTERM then may rightly let it complete.
        """
        mine = _attempts(self.work / "run" / str(trial.user_attrs.get("trial_dir")) / "trial.log").get(trial.number, "")
        return max((int(e) for e in re.findall(r"^rank 0 reports .* at epoch (\d+)$", mine, flags=re.M)), default=-1)

    def _snapshot(self, pid: int, number: int, folder: str) -> None:
        """The newest checkpoint the killed trial process left: what its retry must resume."""
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.snapshots[number] = _newest_checkpoint_epoch(self.work / "run" / folder / "checkpoints")

    def _restart_db(self, down_for: float) -> None:
        start = time.monotonic()
        print(f"{time.monotonic() - self.t0:7.1f}s database stops for {down_for:.1f}s", flush=True)
        self.server.stop()
        time.sleep(down_for)  # the outage itself (a planned length, not a wait for something)
        self.server.start()
        self.db_down = (start, time.monotonic())
        self.db_restarts += 1

    # the end

    def drain(self) -> float:
        """SIGTERM every worker, close the budget at what it counts, drain with fresh workers."""
        import optuna

        from lightstudy.spec import spec_from_dict
        from lightstudy.study import budget, create_study

        start = time.monotonic()
        live = list(self.fleet.live.values())
        for w in live:
            if not w.signals:
                w.signals.append("SIGTERM (drain)")
                running = self._running_trial(w)
                if running is not None:
                    self.terms[running.number] = (w.pid, max(running.intermediate_values, default=-1))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        for w in live:
            try:
                w.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.violations.append(f"worker {w.pid} did not stop within 180 s of SIGTERM")
                w.proc.kill()
                w.proc.wait()
        for w in self.fleet.reap():
            self._judge_exit(w)
        print(f"{time.monotonic() - self.t0:7.1f}s drain: {len(live)} workers stopped", flush=True)
        spec = _spec(1, self.args.keep, self.args.seed)
        used = budget(self.trials(), spec_from_dict(spec)).used
        spec["study"]["n_trials"] = used
        (self.work / "chaos.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        create_study(spec_from_dict(spec), self.url, update_spec=True)  # lightstudy create --update-spec
        print(f"{time.monotonic() - self.t0:7.1f}s drain: budget closed at {used} trials", flush=True)
        drainers = [self.fleet.start(100 + i) for i in range(min(3, self.args.workers))]
        for w in drainers:
            try:
                w.proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                self.violations.append(f"drain worker {w.pid} did not finish the study within 600 s")
        for w in self.fleet.reap():
            self._judge_exit(w, draining=True)
        print(f"{time.monotonic() - self.t0:7.1f}s drain: the study is finished", flush=True)
        deadline = time.monotonic() + 15  # forkservers exit once their worker is gone
        while (stray := self.fleet.stragglers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if stray:
            self.violations.append(f"{len(stray)} process(es) of the workers outlived them: {stray[:10]}")
        self.fleet.kill_all()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return time.monotonic() - start

    def check(self) -> dict[str, Any]:
        from optuna.trial import TrialState

        from lightstudy.artifacts import CheckpointRef
        from lightstudy.checkpoints import kept_trials, lineage_root
        from lightstudy.study import load_study

        _, spec = load_study(self.url, STUDY)  # the spec as the drain closed it
        trials = self.trials()
        by_number = {t.number: t for t in trials}
        n_trials = int(spec.study.n_trials or 0)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        running = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
        # duplicates: a lineage completed twice, or a configuration completed by two lineages
        roots = [lineage_root(t) for t in complete]
        configs = {json.dumps(t.params, sort_keys=True) for t in complete}
        duplicates = (len(roots) - len(set(roots))) + (len(set(roots)) - len(configs))
        lost = max(0, n_trials - len(complete))
        duplicates += max(0, len(complete) - n_trials - duplicates)
        # retries and their resumption
        retries = [t for t in trials if t.system_attrs.get("retry_history")]
        bad_resumes = [f for t in retries if (f := self._resume_fault(t, by_number))]
        # files
        run = self.work / "run"
        orphans = [str(p.relative_to(run)) for p in run.glob("trials/*/checkpoints/*.ckpt")]
        kept = kept_trials(trials, spec)
        kept_ids = {ref.artifact_id for t in kept if (ref := CheckpointRef.of(t))}
        stored = {p.name for p in (run / "artifacts").iterdir()} if (run / "artifacts").is_dir() else set()
        orphans += [f"artifacts/{name}" for name in sorted(stored - kept_ids)]
        numbers = set(by_number)
        for folder in run.glob("trials/trial-*"):
            with contextlib.suppress(ValueError):
                if int(folder.name.split("-", 1)[1]) not in numbers:
                    orphans.append(str(folder.relative_to(run)))
        kept_files = len(kept_ids & stored)
        result = {
            "finished": len(complete),
            "n_trials": n_trials,
            "running": running,
            "duplicates": duplicates,
            "lost": lost,
            "orphans": len(orphans),
            "kept_checkpoints": kept_files,
            "keep": min(spec.study.checkpoints.keep, len(complete)),
            "resumed_ok": len(retries) - len(bad_resumes),
            "retried": len(retries),
            "kills": sum(self.kills.values()),
            "db_restarts": self.db_restarts,
        }
        if lost:
            gone = [t.number for t in trials if t.state != TrialState.COMPLETE and t.number not in _retried(trials)]
            self.violations.append(f"lost {lost} trial(s): counted but not completed: {gone[:20]}")
        if duplicates:
            self.violations.append(f"{duplicates} duplicate(s): {len(complete)} complete in {len(set(roots))} lineages")
        if running:
            self.violations.append(f"{running} trial(s) left RUNNING or WAITING")
        if orphans:
            self.violations.append(f"{len(orphans)} orphan(s): {orphans[:10]}")
        if kept_files != result["keep"] or len(kept_ids) != result["keep"]:
            self.violations.append(f"kept checkpoints: {kept_files} files for the top {result['keep']}")
        for number, (pid, step) in sorted(self.terms.items()):
            t = by_number[number]
            if t.state == TrialState.COMPLETE and max(t.intermediate_values, default=-1) - step >= 2:
                # Only a trial in its last validation may still complete after the signal.
                self.sigterm_ignored += 1
                self.violations.append(
                    f"SIGTERM ignored: worker {pid}'s trial {number} trained on from epoch {step + 1} "
                    f"to {max(t.intermediate_values)} and completed instead of being handed back"
                )
        for fault in bad_resumes:
            self.violations.append(fault)
        if self.db_restarts != 1:
            self.violations.append("the database was not restarted")
        if not result["kills"]:
            self.violations.append("the schedule killed nothing")
        return result

    def _trained(self, trial: Any) -> bool:
        """Whether the trial's own process got to training, by its lineage's ``trial.log``.

        (Its attrs cannot tell: a retry queued by the stale-trial reaper inherits its
        predecessor's user attrs, ``config`` and ``resumed_from`` among them.)
        """
        from lightstudy.checkpoints import lineage_root
        from lightstudy.trial import trial_dir_name

        root = lineage_root(trial)
        if root not in self._logs:
            self._logs[root] = _attempts(self.work / "run" / trial_dir_name(root) / "trial.log")
        return "training starts at epoch" in self._logs[root].get(trial.number, "")

    def _resume_fault(self, retry: Any, by_number: dict[int, Any]) -> str | None:
        """Why ``retry`` did not continue its predecessor's last checkpoint (None: it did)."""
        before = by_number.get(retry.system_attrs["retry_history"][-1])
        if before is None:
            return f"trial {retry.number}: its predecessor is not in the study"
        if not self._trained(retry):
            return None  # its process never got to training: the checkpoint waits for the next retry
        steps = list(before.intermediate_values)
        resumed = retry.user_attrs.get("resumed_from") or {}
        if before.number in self.snapshots:  # its process was SIGKILLed: the files it left
            want = self.snapshots[before.number]
            if want is None and not resumed:
                return None
            if resumed.get("trial") == before.number and resumed.get("epoch") == want:
                return None
            return (
                f"trial {retry.number} resumed {resumed or 'nothing'}; trial {before.number}'s newest "
                f"checkpoint was from epoch {want}"
            )
        if not steps:
            return None
        last = max(steps)
        epoch = resumed.get("epoch")
        if resumed.get("trial") == before.number and epoch is not None and epoch >= last:
            return None
        return f"trial {retry.number} resumed {resumed or 'nothing'}; trial {before.number} had reported epoch {last}"


def _attempts(log: Path) -> dict[int, str]:
    """A lineage's ``trial.log`` by attempt: trial number -> its part (each attempt's process
    starts its part with "trial N of study"); empty where there is no log (yet)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return {}
    attempts: dict[int, str] = {}
    for part in re.split(r"^(?=trial \d+ of study )", text, flags=re.M):
        if head := re.match(r"trial (\d+) of study ", part):
            attempts[int(head[1])] = part
    return attempts


def _retried(trials: list[Any]) -> set[int]:
    from lightstudy.study import retried_numbers

    return retried_numbers(trials)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*experimental")  # Optuna's, for the retry callback
    args = _args()
    work = Path(tempfile.mkdtemp(prefix="lightstudy-chaos-"))
    began = time.monotonic()
    print(f"chaos: {args.minutes:g} min, {args.workers} workers, seed {args.seed}, in {work}", flush=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with PrivatePostgres() as server:
        url = server.database("ls_chaos")
        path = work / "chaos.yaml"
        path.write_text(yaml.safe_dump(_spec(1_000_000, args.keep, args.seed), sort_keys=False))
        from lightstudy.spec import spec_from_dict
        from lightstudy.study import create_study

        create_study(spec_from_dict(yaml.safe_load(path.read_text())), url)  # lightstudy create
        import torch  # noqa: F401  (now: the first checkpoint snapshot must not wait for it)

        chaos = Chaos(args, server, url, work)
        try:
            chaos_s = chaos.run()
            drain_s = chaos.drain()
            result = chaos.check()
        finally:
            chaos.fleet.kill_all()
            if chaos._study is not None:
                with contextlib.suppress(Exception):
                    chaos._study._storage._backend.engine.dispose()
    wall = time.monotonic() - began
    kinds = [[kind, n] for kind, n in chaos.kills.items()]
    table(
        f"chaos: {args.minutes:g} min, seed {args.seed}",
        ["what", "value"],
        [
            *[[f"{kind} (sent)", n] for kind, n in kinds],
            ["events with no target", chaos.skipped],
            ["SIGTERMs the trial ignored", chaos.sigterm_ignored],
            ["database restarts", result["db_restarts"]],
            ["workers started", chaos.fleet.count],
            ["trials finished / budget", f"{result['finished']} / {result['n_trials']}"],
            ["retried / resumed ok", f"{result['retried']} / {result['resumed_ok']}"],
            ["lost / duplicates / running", f"{result['lost']} / {result['duplicates']} / {result['running']}"],
            ["orphans / kept checkpoints", f"{result['orphans']} / {result['kept_checkpoints']} of {result['keep']}"],
            ["chaos / drain / wall s", f"{chaos_s:.0f} / {drain_s:.0f} / {wall:.0f}"],
        ],
    )
    write_jsonl(
        args.out,
        "chaos",
        [{**result, "violations": chaos.violations, "chaos_s": round(chaos_s, 1), "drain_s": round(drain_s, 1)}],
        seed=args.seed,
        minutes=args.minutes,
        workers=args.workers,
        kinds=dict(chaos.kills),
    )
    if args.keep_files or chaos.violations:  # a violation's evidence: the trial logs, the warm logs
        print(f"run folder and worker logs kept in {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    for v in chaos.violations:
        print(f"violation: {v}", file=sys.stderr)
    if chaos.violations:
        print(f"chaos: {len(chaos.violations)} violation(s); replay with --seed {args.seed}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
