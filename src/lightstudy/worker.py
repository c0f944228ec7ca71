"""The worker: a long-lived process that claims trials and runs each in its own child process.

Children are forked by a warm process (:mod:`lightstudy.warmserver`: the launcher's, shared by
its workers, or this worker's own) that has torch, Lightning and the user's modules imported, so
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
import logging
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
    needed_trials,
    remove_local,
    sweep_local,
    would_keep,
)
from lightstudy.devices import check_devices
from lightstudy.gpu_share import mark_alone, read_state, runs_alone
from lightstudy.packing import FREE_RETRIES_ATTR, RETRIED_ALONE_ATTR, died_of_memory
from lightstudy.ranks import finish_exits, run_processes
from lightstudy.scheduler import EPOCHS_ATTR
from lightstudy.spec import trial_world_size
from lightstudy.storage import db_error_text, open_storage, retry_db
from lightstudy.storage.boundary import StudyStorage, trial_id, wrap
from lightstudy.study import load_study
from lightstudy.trial import Message, Outcome, RecordAttr, Report, ShouldPrune, TrialJob, TrialOutcome, trial_dir_name
from lightstudy.warmserver import ADDRESS_VAR, WarmContext, shared_warm

if TYPE_CHECKING:
    import optuna

__all__ = ["Worker", "WorkerReport"]

POLL_INTERVAL = 2.0  # at most this many seconds between budget checks while other workers' trials run
FIRST_POLL = 0.1  # the first such check's wait, doubled up to poll_interval (the last trials often end together)

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
    # out of GPU memory beside other trials (packing.py): retried alone, not counted by max_retry
    Outcome.OUT_OF_MEMORY: ("FAIL", "alone"),
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
        self.db.set_session_options(self.spec.study.storage_options.synchronous_commit)  # workers' sessions only
        self.run_dir = Path(run_dir or self.spec.run_dir).resolve()
        self._signals = 0
        self._children: list[Any] = []  # the running trial's processes (one per rank)
        self._exiting: list[Any] = []  # the last trial's process, exiting while its outcome is recorded
        self._trial: Any = None  # the running trial
        self._ctx: Any = None
        self._warm: Any = None  # this worker's own warm process (none under the launcher's)
        self._store: Any = None
        self.world_size = gpus_per_trial or trial_world_size(self.spec.config)
        check_devices(self.spec, self.world_size, self.url)

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> WorkerReport:
        """Claim and run trials until the study is done, the worker's limit, or a signal.

        One trial, top to bottom: claim (Optuna samples its parameters) → prepare (its folder,
        seed, the checkpoint it resumes from: :meth:`_prepare`) → run (its process(es), heartbeats while
        they train) → record (:meth:`_finish`: as :data:`RECORD` says, then its files).
        """
        from lightstudy.study import claim_trial

        previous = self._install_signal_handlers()
        try:
            self._start_warm()  # it imports torch while the first trial is claimed
            idle = FIRST_POLL
            while not self._signals and (self.max_trials is None or self.report.total < self.max_trials):
                # 1. claim
                claimed = time.time()
                trial, budget = retry_db(lambda: claim_trial(self.study, self.spec), what="claim a trial")
                if trial is None:
                    if budget.done:
                        _log.info("study %s is done (%d trials counted)", self.study_name, budget.used)
                        break
                    self._sleep(min(idle, self.poll_interval))  # others still run trials that may be retried
                    idle *= 2
                    continue
                idle = FIRST_POLL
                # 2. prepare: the lineage's folder, its seed, the checkpoint it resumes from
                prepared = time.time()
                job = self._prepare(trial)
                if job is None:  # a scheduled trial whose parent's checkpoint is missing: failed
                    continue
                # 3. run: rank 0's outcome, or None and why the process died
                start, self._trial = time.time(), trial
                with _Heartbeat(self.db, trial_id(trial), self.spec.study.heartbeat_interval):
                    outcome, died = self._run_child(job)
                if outcome is not None:  # the worker's share of the trial's time, beside the process's own
                    outcome.timings.update(claim=prepared - claimed, prepare=job.started - prepared)
                # 4. record
                self._finish(trial, outcome, died, job.trial_dir, time.time() - start)
        finally:
            finish_exits(self._exiting)
            self._restore_signal_handlers(previous)
            self._stop_warm()
        return self.report

    def _prepare(self, trial: optuna.Trial) -> TrialJob | None:
        """The trial's job: its lineage's folder, its seed, the checkpoint it resumes from (a
        retry's own last.ckpt, or a scheduled trial's parent's), its attrs recorded; None when a
        scheduled trial's parent checkpoint is missing (the trial is then failed)."""
        from optuna.pruners import NopPruner

        frozen = self.db.trial(trial_id(trial))
        root = lineage_root(frozen)
        trial_dir = trial_dir_name(root)
        history = frozen.system_attrs.get("retry_history") or []
        last = self.run_dir / trial_dir / "checkpoints" / "last.ckpt"
        resume, resumed_trial = (str(last), history[-1]) if history and last.exists() else (None, None)
        # a scheduled trial: its epochs in all, and a promotion/PBT step starts from its parent
        epochs, parent = frozen.user_attrs.get(EPOCHS_ATTR), frozen.user_attrs.get("parent_trial")
        parent_trial = self._parent(int(parent)) if parent is not None else None  # one read of the trials
        if resume is None and parent_trial is not None:
            resume, missing = self._link_parent(parent_trial, last)
            resumed_trial = parent_trial.number if resume else None
            if missing:
                self._finish(trial, TrialOutcome(Outcome.FAILED, reason=missing), None, trial_dir, 0.0)
                return None
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
            spec=self.spec,  # parsed once: the trial process validates nothing again
            params=dict(trial.params),
            seed=seed,
            run_dir=str(self.run_dir),
            trial_dir=trial_dir,
            resume=resume,
            resumed_trial=resumed_trial,
            threads=self.threads,
            prunes=not isinstance(self.study.pruner, NopPruner),  # by name or by class path
            max_epochs=None if epochs is None else int(epochs),
            # a PBT exploit: it starts from a checkpoint trained with other parameters
            new_hyperparameters=parent_trial is not None and dict(parent_trial.params) != dict(frozen.params),
        )
        retry_of = f" (retry of {resumed_trial}, resuming)" if resume else ""
        if resume and not history:
            retry_of = f" (from trial {resumed_trial}'s checkpoint, until epoch {epochs})"
        _log.info("trial %d started%s: %s", trial.number, retry_of, _short(job.params))
        return job

    # --- a scheduled trial's start: its parent's checkpoint ------------------------------------

    def _parent(self, number: int) -> Any:
        return next(t for t in self.db.trials(self.study) if t.number == number)

    def _link_parent(self, parent: Any, last: Path) -> tuple[str | None, str | None]:
        """Hard-link (else copy) the ``parent`` trial's last.ckpt to ``last``, this trial's own, so a
        retry resumes from it too; (the path, None) or (None, why it is missing).

        The parent's file stays while any trial needs it (:func:`lightstudy.checkpoints.sweep_local`);
        a checkpoint is replaced by rename, never written in place, so the link is never changed."""
        import shutil

        folder = parent.user_attrs.get(TRIAL_DIR_ATTR)
        source = self.run_dir / folder / "checkpoints" / "last.ckpt" if folder else None
        if source is None or not source.exists():
            return None, (
                f"the checkpoint of parent trial {parent.number} ({source}) is missing: a scheduler's trials "
                "start from their parent's, so every worker must share the run folder"
            )
        last.parent.mkdir(parents=True, exist_ok=True)
        last.unlink(missing_ok=True)
        try:
            os.link(source, last)
        except OSError:  # another file system: copy
            shutil.copy2(source, last)
        return str(last), None

    # --- the trial process ------------------------------------------------------------------

    def _context(self) -> Any:
        """Where trial processes come from: the launcher's warm process (``$LIGHTSTUDY_WARM``), or
        this worker's own, started by :meth:`_start_warm` (see :mod:`lightstudy.warmserver`)."""
        if self._ctx is None:
            address = os.environ.get(ADDRESS_VAR)
            if not address:
                warm = self._start_warm()
                warm.ready()  # its import overlapped the first claim
                address = warm.address
            self._ctx = WarmContext(address)
        return self._ctx

    def _start_warm(self) -> Any:
        """This process's warm process, unless the launcher's is there: the one an earlier worker
        here started, while it is usable, else a new one (it imports at once; see
        :func:`lightstudy.warmserver.shared_warm`)."""
        if self._warm is None and not os.environ.get(ADDRESS_VAR):
            self._warm = shared_warm(self.spec)
        return self._warm

    def _stop_warm(self) -> None:
        """Let go of the warm process: it stays for this process's next worker, and stops at exit."""
        self._warm, self._ctx = None, None

    def _run_child(self, job: TrialJob) -> tuple[TrialOutcome | None, str | None]:
        """Run the trial's process(es) to the end; (rank 0's outcome, None) or (None, why it died)."""
        threads = max(1, self.threads // self.world_size) if self.threads else None
        answer = _answer(self.db, self._trial)
        try:
            return run_processes(
                self._context(),
                job,
                self.world_size,
                threads,
                self.spec.study.trial_timeout,
                self._children,
                answer,
                stopping=lambda: self._signals > 0,
                exiting=self._exiting,
            )
        finally:
            answer.flush()  # a report whose pruning check never came (the process died or stopped)

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
        if state == Outcome.DIED and self._died_of_memory_packed(reason, trial_dir):
            state = Outcome.OUT_OF_MEMORY
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
            if state == Outcome.OUT_OF_MEMORY:
                attrs[RETRIED_ALONE_ATTR] = True  # (said before the tell: the retry is queued after it)
        retried = False
        try:
            self._tell(trial, TrialState[told], values, attrs)  # the attrs in the tell's transaction
            if retry is not None:
                max_retry = self.spec.study.max_retry if retry == "max_retry" else None
                retried = self._retry(trial, max_retry=max_retry, alone=why if retry == "alone" else None)
            self._write_note(trial.number, trial_id(trial))
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
        # with a scheduler, what a promotion or a PBT step may still start from stays
        needed: set[int] = set()
        if self.spec.study.scheduler is not None:
            needed = retry_db(lambda: needed_trials(self.db.trials(self.study), self.spec), what="read the trials")
        if not retried and trial.number not in needed:  # no retry resumes from its last.ckpt
            remove_local(self.run_dir, trial_dir)
        retry_db(lambda: sweep_local(self.study, self.run_dir, spec=self.spec), what="sweep checkpoints")
        self.report.trials.append(trial.number)

    def _write_note(self, number: int, known_id: int | None = None) -> None:
        """Trial ``number``'s note in optuna-dashboard (outcome, reason, params, checkpoint); a failure is logged."""
        from lightstudy.dashboard import write_trial_note

        try:
            retry_db(lambda: write_trial_note(self.study, self.spec, number, trial_id=known_id), what="trial note")
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
        elif state == Outcome.OUT_OF_MEMORY and retried:  # not the configuration's failure
            self.report.interrupted += 1
            _log.warning("trial %d ran out of GPU memory beside other trials (%s)", trial.number, why)
        else:
            self.report.failed += 1
            _log.warning("trial %d failed%s: %s", trial.number, " (will be retried)" if retried else "", why)

    def _tell(
        self, trial: optuna.Trial, state: Any, values: list[float] | None = None, attrs: dict[str, Any] | None = None
    ) -> None:
        """``study.tell`` with the attempt's ``attrs``, riding out a database restart.

        A tell whose commit reached the database just before the connection broke is not told
        twice (``skip_if_finished``); a trial that someone else finished meanwhile (failed as
        stale while the database was away) raises ``UpdateFinishedTrialError`` as Optuna would.
        """
        from optuna.exceptions import UpdateFinishedTrialError

        def stored() -> Any:
            return self.db.state(trial_id(trial))

        if (before := stored()).is_finished():
            if attrs:
                self._set_attrs(trial, attrs)  # what this attempt measured, on the trial it ran
            raise UpdateFinishedTrialError(f"trial {trial.number} is already {before.name}")
        self.db.tell(self.study, trial, values, state, attrs)
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

    def _retry(self, trial: optuna.Trial, *, max_retry: int | None, alone: str | None = None) -> bool:
        """Queue a WAITING copy of a failed trial (same params, inherited intermediate values).

        ``alone`` (why): the copy runs alone on its GPU, and this attempt, like every earlier one
        that ran out of GPU memory beside others, does not count towards ``max_retry``.
        """
        frozen = copy.deepcopy(self.db.trial(trial_id(trial)))
        free = int(frozen.system_attrs.get(FREE_RETRIES_ATTR, 0)) + (alone is not None)
        if alone is not None:
            frozen.system_attrs[FREE_RETRIES_ATTR] = free  # the copy inherits the count
            mark_alone(self.run_dir / trial_dir_name(lineage_root(frozen)), alone)  # before the copy is claimable
        attempts = len(frozen.system_attrs.get("retry_history", [])) + 1 - free
        if max_retry is not None and attempts > max_retry:  # the callback's own rule, read first
            return False
        self.db.requeue(self.study, frozen, None if max_retry is None else max_retry + free)
        return True

    def _died_of_memory_packed(self, reason: str | None, trial_dir: str) -> bool:
        """A trial process SIGKILLed (the OOM killer's way) while it shared its GPU, not yet alone."""
        state = read_state(self.run_dir, self.gpu)
        packed = state is not None and state.packed
        return packed and died_of_memory(reason) and not runs_alone(self.run_dir / trial_dir)

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


def _answer(db: StudyStorage, trial: optuna.Trial) -> _Answer:
    """What the worker does for the trial process: report, decide pruning, record attrs."""
    return _Answer(db, trial)


class _Answer:
    """Answers the trial process's messages through the storage boundary.

    Optuna's pruning callback reports an epoch's value, then asks ``should_prune``: where the
    study prunes, the report waits (microseconds, in this process) for that question and both
    go in one transaction (:meth:`StudyStorage.report_and_prune`). Any other message, and
    :meth:`flush` when the trial process is gone, write a waiting report first, so nothing the
    process sent is dropped and the order is kept.
    """

    def __init__(self, db: StudyStorage, trial: optuna.Trial) -> None:
        from optuna.pruners import NopPruner

        self.db = db
        self.trial = trial
        self.batches = not isinstance(trial.study.pruner, NopPruner)  # a pruning check follows each report
        self.waiting: Report | None = None

    def __call__(self, message: Message) -> Any:
        if isinstance(message, ShouldPrune):
            report, self.waiting = self.waiting, None
            if report is not None:
                return self.db.report_and_prune(self.trial, report.value, report.step)
            return self.db.should_prune(self.trial)
        self.flush()
        if isinstance(message, Report):
            if self.batches:
                self.waiting = message
            else:
                self.db.report(self.trial, message.value, message.step)
        elif isinstance(message, RecordAttr):
            self.db.record(self.trial, message.key, message.value, system=message.system)
        return None

    def flush(self) -> None:
        """Write the report that waits for its pruning check (the trial process is gone)."""
        report, self.waiting = self.waiting, None
        if report is not None:
            self.db.report(self.trial, report.value, report.step)


def _short(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in params.items())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_fmt(v) for v in value)
    return str(value)
