"""The worker: a long-lived process that claims trials and runs each in its own child process.

Children start from a forkserver that has torch, Lightning and the user's modules imported, so
a trial starts warm (tens of milliseconds) yet GPU memory, leaks and crashes stay with the trial.
The worker itself never imports torch and never touches CUDA. It owns the trial's state in the
database: it samples the parameters, sends heartbeats while the child trains, and tells Optuna
the outcome; a child that dies (signal, out of memory) fails its trial, which is retried from
its last checkpoint. SIGTERM/SIGINT: stop claiming, have the child save a checkpoint, hand the
trial back for a retry, exit 0; a second signal kills the child at once.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy.artifacts import CheckpointRef, describe_store, make_store, upload_checkpoint
from lightstudy.checkpoints import (
    CHECKPOINT_ATTR,
    TRIAL_DIR_ATTR,
    enforce_retention,
    lineage_root,
    remove_local,
    sweep_local,
    would_keep,
)
from lightstudy.ranks import check_devices, run_processes
from lightstudy.spec import trial_world_size
from lightstudy.storage import db_error_text, open_storage, retry_db
from lightstudy.storage.boundary import StudyStorage, trial_id, wrap
from lightstudy.study import load_study
from lightstudy.trial import Message, Outcome, RecordAttr, Report, ShouldPrune, TrialJob, TrialOutcome, trial_dir_name

if TYPE_CHECKING:
    import optuna

__all__ = ["Worker", "WorkerReport"]

WARM_SPEC_VAR = "LIGHTSTUDY_WARM_SPEC"  # lightstudy._warm's (it imports torch: the worker never does)
POLL_INTERVAL = 2.0  # seconds between budget checks while other workers' trials run

# How each outcome is recorded: (the trial's state in Optuna, its retry: None for none,
# "always" for a hand-back that max_retry does not limit, "max_retry" for up to that many
# attempts). A trial that is retried keeps its local last.ckpt for the retry to resume from.
RECORD: dict[Outcome, tuple[str, str | None]] = {
    Outcome.COMPLETE: ("COMPLETE", None),
    Outcome.PRUNED: ("PRUNED", None),
    Outcome.FAILED: ("FAIL", None),  # an exception: the parameters' fault
    Outcome.INTERRUPTED: ("FAIL", "always"),  # stopped by a signal: not the trial's fault
    Outcome.DIED: ("FAIL", "max_retry"),  # killed (out of memory, a dead rank)
    Outcome.TIMED_OUT: ("FAIL", None),  # past study.trial_timeout: a retry would time out too
}

_log = logging.getLogger(__name__)


@dataclass
class WorkerReport:
    """What one worker did."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    interrupted: int = 0
    trials: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.complete + self.pruned + self.failed + self.interrupted


class Worker:
    """Runs trials of one study until its study-wide budget is spent.

    Args:
        url: Storage URL of the study database.
        study_name: The study (created by ``lightstudy create``/``run``).
        run_dir: Run folder for checkpoints and logs; default: the spec's (``runs/<name>``).
        gpu: The GPU(s) this worker owns (a ``CUDA_VISIBLE_DEVICES`` value), recorded on trials.
        threads: torch threads per trial on CPU (default: torch's own choice).
        max_trials: Stop after this many trials of this worker (default: no limit).
    """

    def __init__(
        self,
        url: str,
        study_name: str,
        *,
        run_dir: str | Path | None = None,
        gpu: str | None = None,
        threads: int | None = None,
        max_trials: int | None = None,
        poll_interval: float = POLL_INTERVAL,
        gpus_per_trial: int | None = None,
    ) -> None:
        self.url = url
        self.study_name = study_name
        self.gpu = gpu
        self.threads = threads
        self.max_trials = max_trials
        self.poll_interval = poll_interval
        self.report = WorkerReport()
        storage = open_storage(url, create=False, wait=True)  # a restarting database is waited for
        self.db = wrap(storage)  # the storage boundary: every trial-state read and write goes here
        self.study, self.spec = load_study(url, study_name, storage=storage)
        self.run_dir = Path(run_dir or self.spec.run_dir).resolve()
        self._signals = 0
        self._children: list[Any] = []  # the running trial's processes (one per rank)
        self._trial: Any = None  # the running trial
        self._ctx: Any = None
        self._store: Any = None
        self.world_size = gpus_per_trial or trial_world_size(self.spec.config)
        check_devices(self.spec, self.world_size, self.url)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> WorkerReport:
        """Claim and run trials until the study is done, the worker's limit, or a signal.

        One trial, top to bottom: claim (Optuna samples its parameters) → prepare (its folder,
        seed, and the checkpoint a retry resumes from) → run (its process(es), heartbeats while
        they train) → record (:meth:`_finish`: as :data:`RECORD` says, then its files).
        """
        from optuna.pruners import NopPruner

        from lightstudy.study import claim_trial

        previous = self._install_signal_handlers()
        try:
            while not self._signals and (self.max_trials is None or self.report.total < self.max_trials):
                # 1. claim
                claimed = time.time()
                trial, budget = retry_db(lambda: claim_trial(self.study, self.spec), what="claim a trial")
                if trial is None:
                    if budget.done:
                        _log.info("study %s is done (%d trials counted)", self.study_name, budget.used)
                        break
                    self._sleep(self.poll_interval)  # others still run trials that may be retried
                    continue
                # 2. prepare: the lineage's folder, its seed, a retry's last.ckpt
                prepared = time.time()
                frozen = self.db.trial(trial_id(trial))
                root = lineage_root(frozen)
                trial_dir = trial_dir_name(root)
                history = frozen.system_attrs.get("retry_history") or []
                last = self.run_dir / trial_dir / "checkpoints" / "last.ckpt"
                resume, resumed_trial = (str(last), history[-1]) if history and last.exists() else (None, None)
                seed = frozen.user_attrs.get("seed")
                if seed is None and self.spec.study.seed is not None:
                    seed = (self.spec.study.seed + root) % 2**31
                worker = f"{socket.gethostname()}:{os.getpid()}"
                attrs = {"seed": seed, "worker": worker, "gpu": self.gpu, "threads": self.threads}
                self._set_attrs(trial, {**attrs, TRIAL_DIR_ATTR: trial_dir})
                job = TrialJob(
                    storage_url=self.url,
                    study_name=self.study_name,
                    trial_id=trial_id(trial),
                    number=trial.number,
                    spec=self.spec.to_dict(),
                    params=dict(trial.params),
                    seed=seed,
                    run_dir=str(self.run_dir),
                    trial_dir=trial_dir,
                    resume=resume,
                    resumed_trial=resumed_trial,
                    threads=self.threads,
                    prunes=not isinstance(self.study.pruner, NopPruner),  # by name or by class path
                )
                retry_of = f" (retry of {resumed_trial}, resuming)" if resume else ""
                _log.info("trial %d started%s: %s", trial.number, retry_of, _short(job.params))
                # 3. run: rank 0's outcome, or None and why the process died
                start, self._trial = time.time(), trial
                with _Heartbeat(self.db, trial_id(trial), self.spec.study.heartbeat_interval):
                    outcome, died = self._run_child(job)
                if outcome is not None:  # the worker's share of the trial's time, beside the process's own
                    outcome.timings.update(claim=prepared - claimed, prepare=job.started - prepared)
                # 4. record
                self._finish(trial, outcome, died, trial_dir, time.time() - start)
        finally:
            self._restore_signal_handlers(previous)
        return self.report

    # --- the trial process ------------------------------------------------------------------

    def _context(self) -> Any:
        if self._ctx is None:
            # NVML answers "is there a GPU?" without initializing CUDA in the warm process.
            os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
            # Preloading lightstudy._warm runs its warm_forkserver(study's spec) in the forkserver:
            # imports, one tiny trial, this study's config through its own cli: class, all logged.
            os.environ[WARM_SPEC_VAR] = json.dumps(self.spec.to_dict(with_storage=False))
            ctx = multiprocessing.get_context("forkserver")
            # (not "__main__": Python 3.11 never passes its path to the forkserver; the CLI
            # script a child re-runs as its main module only imports lightstudy.cli, preloaded.)
            ctx.set_forkserver_preload(["lightstudy._warm", "lightstudy.cli", *self._user_modules()])
            self._ctx = ctx
        return self._ctx

    def _user_modules(self) -> list[str]:
        modules = []
        for section in ("model", "data"):
            value = self.spec.config.get(section)
            if isinstance(value, dict) and isinstance(value.get("class_path"), str):
                modules.append(value["class_path"].rpartition(".")[0])
        return modules

    def _run_child(self, job: TrialJob) -> tuple[TrialOutcome | None, str | None]:
        """Run the trial's process(es) to the end; (rank 0's outcome, None) or (None, why it died)."""
        threads = max(1, self.threads // self.world_size) if self.threads else None
        return run_processes(
            self._context(),
            job,
            self.world_size,
            threads,
            self.spec.study.trial_timeout,
            self._children,
            _answer(self.db, self._trial),
            stopping=lambda: self._signals > 0,
        )

    # --- telling Optuna ---------------------------------------------------------------------

    def _finish(
        self,
        trial: optuna.Trial,
        outcome: TrialOutcome | None,
        reason: str | None,
        trial_dir: str,
        seconds: float,
    ) -> None:
        """Record the outcome as :data:`RECORD` says: the trial's state in Optuna, a retry or not."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        state = outcome.state if outcome is not None else Outcome.DIED
        if state == Outcome.DIED and self._signals:  # killed because we were stopping: hand back
            state = Outcome.INTERRUPTED
        told, retry = RECORD[state]
        if outcome is not None:
            why = outcome.reason or "unknown"
        else:  # the process died: why, or that we were stopping
            why = "stopped by signal" if state == Outcome.INTERRUPTED else (reason or "unknown")
        attrs = self._attempt_attrs(trial, outcome)
        values, ref = None, None
        if state == Outcome.COMPLETE:
            assert outcome is not None and outcome.values is not None
            values, uploading = outcome.values, time.time()
            ref = self._store_checkpoint(trial, values, outcome.checkpoint)
            if ref is not None:
                attrs[CHECKPOINT_ATTR] = ref.to_dict()
            attrs["timings"]["checkpoint"] = round(time.time() - uploading, 4)
        elif told == "FAIL":
            attrs["fail_reason"] = why
            if state == Outcome.INTERRUPTED:
                attrs["interrupted"] = True
        retried = False
        try:
            self._set_attrs(trial, attrs)
            self._tell(trial, TrialState[told], values)
            if retry is not None:
                retried = self._retry(trial, max_retry=self.spec.study.max_retry if retry == "max_retry" else None)
            self._write_note(trial.number)
        except UpdateFinishedTrialError:
            # The database was away longer than the grace period and another worker failed the
            # trial as stale (and retried it); its outcome here is lost, the study is not.
            _log.warning("trial %d was failed as stale by another worker meanwhile", trial.number)
            retried = True
        self._count(trial, state, values, why, seconds, retried)
        if ref is not None:  # only a checkpoint that entered the top k can push one out
            removed = retry_db(lambda: enforce_retention(self.study, self.spec, self.store), what="retention")
            for number in removed:  # their notes said "kept"
                self._write_note(number)
        if not retried:  # no retry resumes from its last.ckpt: the trial's local files go
            remove_local(self.run_dir, trial_dir)
        retry_db(lambda: sweep_local(self.study, self.run_dir), what="sweep checkpoints")
        self.report.trials.append(trial.number)

    def _write_note(self, number: int) -> None:
        """Trial ``number``'s note in optuna-dashboard (outcome, reason, params, checkpoint); a failure is logged."""
        from lightstudy.dashboard import write_trial_note

        try:
            retry_db(lambda: write_trial_note(self.study, self.spec, number), what="trial note")
        except Exception as e:  # the note is for people reading the dashboard: the trial counts without it
            _log.warning("trial %d: could not write its dashboard note (%s)", number, db_error_text(e))

    def _attempt_attrs(self, trial: optuna.Trial, outcome: TrialOutcome | None) -> dict[str, Any]:
        """What the trial process measured and warned about, as the trial's user attrs."""
        attrs: dict[str, Any] = {}
        if outcome is not None:
            attrs["timings"] = {k: round(v, 4) for k, v in outcome.timings.items()}
            if outcome.warnings:
                attrs["warnings"] = outcome.warnings
                for text in outcome.warnings:
                    _log.warning("trial %d: %s", trial.number, text)
        return attrs

    def _count(
        self, trial: optuna.Trial, state: Outcome, values: list[float] | None, why: str, seconds: float, retried: bool
    ) -> None:
        if state == Outcome.COMPLETE:
            self.report.complete += 1
            metrics = ",".join(self.spec.study.metrics)
            _log.info("trial %d complete: %s=%s in %.1fs", trial.number, metrics, _fmt(values), seconds)
        elif state == Outcome.PRUNED:
            self.report.pruned += 1
            _log.info("trial %d pruned in %.1fs (%s)", trial.number, seconds, why)
        elif state == Outcome.INTERRUPTED:
            self.report.interrupted += 1
            _log.info("trial %d handed back for a retry (%s)", trial.number, why)
        else:
            self.report.failed += 1
            _log.warning("trial %d failed%s: %s", trial.number, " (will be retried)" if retried else "", why)

    def _tell(self, trial: optuna.Trial, state: Any, values: list[float] | None = None) -> None:
        """``study.tell``, riding out a database restart.

        A tell whose commit reached the database just before the connection broke is not told
        twice (``skip_if_finished``); a trial that someone else finished meanwhile (failed as
        stale while the database was away) raises ``UpdateFinishedTrialError`` as Optuna would.
        """
        from optuna.exceptions import UpdateFinishedTrialError

        def stored() -> Any:
            return self.db.trial(trial_id(trial)).state

        if (before := stored()).is_finished():
            raise UpdateFinishedTrialError(f"trial {trial.number} is already {before.name}")
        self.db.tell(self.study, trial, values, state)
        if (after := stored()) != state:
            raise UpdateFinishedTrialError(f"trial {trial.number} is already {after.name}")

    @property
    def store(self) -> Any:
        if self._store is None:
            self._store = make_store(self.spec, self.run_dir)
        return self._store

    def _store_checkpoint(self, trial: optuna.Trial, values: list[float], rel: str | None) -> CheckpointRef | None:
        """Upload the trial's best checkpoint if it enters the study's top k now."""
        if rel is None:
            return None
        trials = self.db.trials(self.study)
        if not would_keep(trials, self.spec, trial.number, values):
            return None
        path = self.run_dir / rel
        name = f"trial-{trial.number:04d}-{path.name}"
        try:
            return retry_db(
                lambda: upload_checkpoint(self.store, self.study, trial_id(trial), path, name),
                what="store the checkpoint",
            )
        except Exception as e:  # the trial still counts; only its checkpoint is lost
            _log.error(
                "trial %d: could not store its checkpoint in %s: %s",
                trial.number,
                describe_store(self.spec, self.run_dir),
                e,
            )
            return None

    def _set_attrs(self, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
        self.db.set_trial_attrs(trial_id(trial), attrs)

    def _retry(self, trial: optuna.Trial, *, max_retry: int | None) -> bool:
        """Queue a WAITING copy of a failed trial (same params, inherited intermediate values)."""
        frozen = copy.deepcopy(self.db.trial(trial_id(trial)))
        attempts = len(frozen.system_attrs.get("retry_history", [])) + 1
        if max_retry is not None and attempts > max_retry:  # the callback's own rule, read first
            return False
        self.db.requeue(self.study, frozen, max_retry)
        return True

    # --- signals ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        children = list(self._children)
        if self._signals == 1:
            _log.warning(
                "%s: no new trials; the running one saves a checkpoint and is handed back "
                "(signal again to stop at once)",
                signal.Signals(signum).name,
            )
            for child in children:
                if child.pid:
                    with contextlib.suppress(OSError):
                        os.kill(child.pid, signal.SIGTERM)
        elif children:
            _log.warning("second signal: stopping the trial at once")
            for child in children:
                with contextlib.suppress(OSError):
                    child.kill()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._signals and time.monotonic() < end:
            time.sleep(0.1)


class _Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds while the trial process runs."""

    def __init__(self, db: StudyStorage, trial: int, interval: float) -> None:
        self._db = db
        self._trial = trial
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._db.beat(self._trial)
            except Exception as e:  # the database may be restarting: keep trying
                _log.warning("heartbeat of trial id %d failed (%s); will try again", self._trial, db_error_text(e))


def _answer(db: StudyStorage, trial: optuna.Trial) -> Any:
    """What the worker does for the trial process: report, decide pruning, record attrs."""

    def handle(message: Message) -> Any:
        if isinstance(message, Report):
            db.report(trial, message.value, message.step)
        elif isinstance(message, ShouldPrune):
            return db.should_prune(trial)
        elif isinstance(message, RecordAttr):
            db.record(trial, message.key, message.value, system=message.system)
        return None

    return handle


def _short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in params.items())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    return str(value)
