"""One trial, run inside its own process: config → LightningCLI → Trainer.fit → metric value.

The worker samples the parameters and owns the trial's state in the database; this process
builds the model, data module and Trainer from the spec's config with the parameters applied at
their dotted paths, trains with the pruning, checkpoint and guard callbacks, and sends back a
:class:`TrialOutcome`. Anything it raises becomes a failed outcome with the reason.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightstudy.spec import StudySettings, StudySpec

__all__ = [
    "Finished",
    "Message",
    "Outcome",
    "RecordAttr",
    "Report",
    "ShouldPrune",
    "TrialJob",
    "TrialOutcome",
    "run_trial",
    "trial_dir_name",
    "trial_main",
]

_log = logging.getLogger(__name__)


def trial_dir_name(root_number: int) -> str:
    """Folder of a trial (and of its retries) relative to the run folder."""
    return f"trials/trial-{root_number:04d}"


@dataclass(frozen=True)
class TrialJob:
    """Everything the trial process needs, sent to it by the worker."""

    storage_url: str
    study_name: str
    trial_id: int
    number: int
    spec: StudySpec  # parsed by the worker; pickled to the trial process, never validated again
    params: dict[str, Any]
    seed: int | None
    run_dir: str
    trial_dir: str  # relative to run_dir
    resume: str | None = None  # checkpoint to continue from (a retry)
    resumed_trial: int | None = None  # the trial whose checkpoint `resume` is
    threads: int | None = None  # torch threads on CPU
    started: float = field(default_factory=time.time)
    rank: int = 0  # this process's rank in a multi-device (DDP) trial
    world_size: int = 1  # processes of the trial; > 1: one per device, launched by the worker
    master_port: int | None = None  # rendezvous port of a DDP trial (on 127.0.0.1)
    prunes: bool = True  # False: the study's pruner is a NopPruner (never ask the worker)
    # A scheduler's trial (lightstudy.scheduler): train until this many epochs in all (trainer.max_epochs)
    max_epochs: int | None = None
    # It resumes a checkpoint trained with other parameters (a PBT exploit): the optimizers keep
    # their restored state, but their hyperparameters (lr, weight_decay, ...) are this trial's
    new_hyperparameters: bool = False


class Outcome(str, Enum):
    """How a trial ended: the process reports the first four; the worker sees the last two."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"  # an exception: the parameters' fault, not retried
    INTERRUPTED = "interrupted"  # a stop request: checkpoint saved, handed back
    DIED = "died"  # the process was killed (signal, out of memory): retried
    TIMED_OUT = "timed_out"  # ran past study.trial_timeout and was killed: not retried
    OUT_OF_MEMORY = "out_of_memory"  # out of GPU memory beside other trials: retried alone (packing.py)


@dataclass
class TrialOutcome:
    """What the trial process reports back to the worker."""

    state: Outcome
    values: list[float] | None = None
    checkpoint: str | None = None  # best checkpoint, relative to the run folder
    reason: str | None = None  # why it failed or was interrupted
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # things the user should know (wrong direction, ...)


# --- what the trial process sends the worker over its pipe (the worker answers ShouldPrune) ---


@dataclass(frozen=True)
class Report:
    """An intermediate value, for ``trial.report``."""

    value: float
    step: int


@dataclass(frozen=True)
class ShouldPrune:
    """Asks ``trial.should_prune()``; the worker sends back a bool."""


@dataclass(frozen=True)
class RecordAttr:
    """A user attr of the trial (``trial.set_user_attr``), or with ``system`` a system attr."""

    key: str
    value: Any
    system: bool = False


@dataclass(frozen=True)
class Finished:
    """The last message: how the trial ended."""

    outcome: TrialOutcome


Message = Report | ShouldPrune | RecordAttr | Finished


def trial_main(job: TrialJob, conn: Any) -> None:
    """Entry point of the trial process: run the trial, send the outcome, exit."""
    from lightstudy.stopping import install_stop_handlers

    install_stop_handlers()
    _die_with_worker(conn)
    if job.world_size > 1:
        # The worker launched every rank: Lightning's environment sees LOCAL_RANK and joins them.
        os.environ.update(
            LOCAL_RANK=str(job.rank),
            RANK=str(job.rank),
            NODE_RANK="0",
            WORLD_SIZE=str(job.world_size),
            LOCAL_WORLD_SIZE=str(job.world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(job.master_port),
        )
    name = "trial.log" if job.rank == 0 else f"trial.rank{job.rank}.log"
    log_path = Path(job.run_dir) / job.trial_dir / name
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from lightstudy.lightning_config import quiet_lightning

    quiet_lightning()  # Lightning's INFO lines and noise warnings out of trial.log ($LIGHTSTUDY_VERBOSE keeps them)
    try:
        outcome = run_trial(job, conn)
    except BaseException as e:  # never let the worker guess what happened
        traceback.print_exc()
        outcome = TrialOutcome(Outcome.FAILED, reason=_describe(e))
    sys.stdout.flush()
    sys.stderr.flush()
    conn.send(Finished(outcome))
    conn.close()


class WorkerTrial:
    """The trial as the trial process sees it: reports, pruning questions and user attrs go to
    the worker over the pipe, and the worker asks Optuna.

    The process then needs no database connection of its own (a fleet of workers holds half the
    connections, and a trial starts without opening the storage); Optuna's pruning callback
    only calls ``report`` and ``should_prune``. A multi-device (DDP) trial still opens the
    storage in every rank: the callback shares its verdict between ranks through it.
    """

    def __init__(self, conn: Any, number: int, params: dict[str, Any], *, prunes: bool = True) -> None:
        self._conn = conn
        self.number = number
        self.params = params
        self._prunes = prunes  # False: the study's pruner is NopPruner, so never wait on the answer

    def report(self, value: float, step: int) -> None:
        self._conn.send(Report(float(value), int(step)))

    def should_prune(self) -> bool:
        if not self._prunes:
            return False
        self._conn.send(ShouldPrune())
        return bool(self._conn.recv())

    def set_user_attr(self, key: str, value: Any) -> None:
        self._conn.send(RecordAttr(key, value))

    def set_system_attr(self, key: str, value: Any) -> None:
        self._conn.send(RecordAttr(key, value, system=True))


def run_trial(job: TrialJob, conn: Any = None) -> TrialOutcome:
    """Train one trial and return its outcome (pruned and failed ones included).

    With ``conn`` (the pipe to the worker) a one-device trial talks to Optuna through the worker;
    without it, or under DDP, it opens the study's storage itself.
    """
    import optuna

    from lightstudy.errors import LightstudyError
    from lightstudy.storage import retry_db

    timings = {"start": time.time() - job.started}
    rank = f", rank {job.rank} of {job.world_size}" if job.world_size > 1 else ""
    print(
        f"trial {job.number} of study {job.study_name!r}, pid {os.getpid()}{rank}, parent {os.getppid()}, "
        f"params {job.params}",
        flush=True,
    )
    t = time.time()
    if conn is not None and job.world_size == 1:
        trial: Any = WorkerTrial(conn, job.number, job.params, prunes=job.prunes)
    else:
        trial = retry_db(lambda: _open_trial(job), what="open the study")
    timings["storage"] = time.time() - t
    memory = _gpu_memory(job, trial)
    try:
        with memory:  # its turn on a shared GPU, its memory cap, its peak recorded (packing.py)
            return _train(job, trial, timings)
    except optuna.TrialPruned as e:
        print(f"pruned: {e}", flush=True)
        return TrialOutcome(Outcome.PRUNED, reason=str(e), timings=timings)
    except LightstudyError as e:
        print(f"failed: {e}", flush=True)
        return TrialOutcome(Outcome.FAILED, reason=str(e), timings=timings)
    except BaseException as e:  # SystemExit too: Lightning's SIGTERMException is one
        from lightstudy.callbacks import TrialInterrupted, stop_requested

        if isinstance(e, TrialInterrupted) or stop_requested():
            why = str(e) if isinstance(e, TrialInterrupted) else f"stopped by signal ({type(e).__name__})"
            print(f"interrupted: {why}", flush=True)
            return TrialOutcome(Outcome.INTERRUPTED, reason=why, timings=timings)
        if not isinstance(e, Exception):
            raise
        traceback.print_exc()
        if memory.is_out_of_memory(e):  # retried alone if it shared its GPU
            alone, why = memory.out_of_memory(_describe(e))
            return TrialOutcome(Outcome.OUT_OF_MEMORY if alone else Outcome.FAILED, reason=why, timings=timings)
        return TrialOutcome(Outcome.FAILED, reason=_describe(e), timings=timings)


def _gpu_memory(job: TrialJob, trial: Any) -> Any:
    """The trial's GPU memory guard (gpu_share.TrialMemory): waits its turn, caps, measures."""
    from lightstudy.gpu_share import TrialMemory

    return TrialMemory(job, trial)


def _open_trial(job: TrialJob) -> Any:
    import optuna

    from lightstudy.components import build_pruner
    from lightstudy.storage import open_storage

    storage = open_storage(job.storage_url, create=False)
    study = optuna.load_study(
        study_name=job.study_name,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(),  # parameters were sampled by the worker
        pruner=build_pruner(job.spec),
    )
    return optuna.Trial(study, job.trial_id)


@dataclass
class Fitted:
    """A finished ``Trainer.fit``: the objective values and the best checkpoint's path."""

    values: list[float]
    best_path: str | None
    built: Any  # lightning_config.Built
    warnings: list[str] = field(default_factory=list)
    save_seconds: float = 0.0  # spent writing checkpoints (part of the fit)


def fit_config(
    config: dict[str, Any],
    settings: StudySettings,
    *,
    ckpt_dir: Path,
    seed: int | None,
    trial: Any = None,
    resume: str | None = None,
    on_built: Callable[[Any], None] | None = None,
    cli: str | None = None,
    new_hyperparameters: bool = False,
) -> Fitted:
    """Build the config with LightningCLI and fit it with lightstudy's callbacks.

    Args:
        config: A LightningCLI config (parameters already applied).
        settings: The study block: metric(s) and direction(s).
        ckpt_dir: Where ModelCheckpoint writes (best epoch, and last.ckpt for a resume).
        seed: Passed to ``seed_everything`` before anything is built.
        trial: The Optuna trial to report to and prune (None: no pruning, as in ``reproduce``).
        resume: A checkpoint to continue from (loaded with ``weights_only=True``).
        on_built: Called with the built objects before training starts.
        cli: The study's LightningCLI subclass (``cli:``) to parse and instantiate through.
        new_hyperparameters: ``resume`` was trained with other parameters: its optimizer state is
            restored but each param group's hyperparameters are the ones this config builds.

    Raises:
        TrialError: no validation score for the metric was recorded.
        optuna.TrialPruned: the pruner stopped the trial.
    """
    from lightstudy.callbacks import (
        checkpoint_callback,
        guard_callback,
        last_checkpoint_callback,
        pruning_callback,
        time_checkpoint_io,
    )
    from lightstudy.errors import TrialError
    from lightstudy.lightning_config import build, lightning_namespace

    namespace = lightning_namespace(config)
    metrics = list(settings.metrics)
    monitor = None if settings.is_multi_objective else settings.metric
    mode = "max" if settings.direction == "maximize" else "min"
    last = ckpt_dir / "last.ckpt"
    checkpoint = checkpoint_callback(namespace, ckpt_dir, monitor, mode)
    guard = guard_callback(namespace, metrics, last, list(settings.directions))
    callbacks = [guard, checkpoint, last_checkpoint_callback(namespace, last)]
    if new_hyperparameters and resume is not None:
        from lightstudy.callbacks import hyperparameters_callback

        callbacks.append(hyperparameters_callback(namespace))
    pruning = None
    if trial is not None and not settings.is_multi_objective:
        pruning = pruning_callback(namespace, trial, settings.metric)
        callbacks.insert(0, pruning)
    built = build(config, callbacks=callbacks, seed=seed, cli=cli)
    saving = time_checkpoint_io(namespace, built.trainer)
    if on_built is not None:
        on_built(built)
    built.trainer.fit(built.model, datamodule=built.datamodule, ckpt_path=resume, weights_only=True)
    if pruning is not None and pruning.is_ddp_backend:
        # Under DDP the callback only stops every rank together; the verdict is read here.
        pruning.check_pruned()
    print(f"training ended at epoch {built.trainer.current_epoch}", flush=True)
    if settings.is_multi_objective:
        values = [float(built.trainer.callback_metrics[m]) for m in metrics]
        return Fitted(values, str(last) if last.exists() else None, built, guard.warnings, saving.seconds)
    if checkpoint.best_model_score is None:
        logged = ", ".join(sorted(built.trainer.callback_metrics)) or "none"
        raise TrialError(
            f"no validation score for {settings.metric!r} was recorded (logged: {logged})",
            fix="make sure validation runs (val_dataloader, limit_val_batches > 0)",
        )
    best = checkpoint.best_model_path or None
    return Fitted([float(checkpoint.best_model_score)], best, built, guard.warnings, saving.seconds)


def _train(job: TrialJob, trial: Any, timings: dict[str, float]) -> TrialOutcome:
    import torch

    from lightstudy.lightning_config import lightning_namespace
    from lightstudy.search_space import apply_params
    from lightstudy.storage import record_attr
    from lightstudy.summary import CONFIG_ATTR, config_summary

    t = time.time()
    if job.threads:
        torch.set_num_threads(job.threads)
    spec = job.spec
    run_dir = Path(job.run_dir)
    config = apply_params(spec.lightning_config(), job.params)
    _add_trial_defaults(config, lightning_namespace(config), run_dir, job.trial_dir)
    if job.max_epochs is not None:
        config["trainer"]["max_epochs"] = job.max_epochs
    if job.world_size > 1 and config["trainer"].get("strategy", "auto") == "auto":
        config["trainer"]["strategy"] = "ddp"  # the worker launched one process per device

    def record(built: Any) -> None:
        # the resolved config (~1,350 characters) goes to a system attr, which optuna-dashboard
        # does not lay out on the trial's page; the user attrs hold a one-line summary of it
        attrs: dict[str, Any] = {"config_summary": config_summary(built.config), "versions": _versions(built.namespace)}
        if job.resume:
            epoch = _checkpoint_epoch(job.resume)
            attrs["resumed_from"] = {
                "trial": job.resumed_trial,
                "epoch": epoch,
                "checkpoint": os.path.relpath(job.resume, run_dir),
            }
            print(f"resuming trial {job.resumed_trial} from {job.resume} (saved in epoch {epoch})", flush=True)
        if job.rank == 0:
            record_attr(trial, CONFIG_ATTR, built.config, system=True)
            for key, value in attrs.items():
                record_attr(trial, key, value)
        timings["setup"] = time.time() - t

    fitted = fit_config(
        config,
        spec.study,
        ckpt_dir=run_dir / job.trial_dir / "checkpoints",
        seed=job.seed,
        trial=trial,
        resume=job.resume,
        on_built=record,
        cli=spec.cli,
        new_hyperparameters=job.new_hyperparameters,
    )
    timings["fit"] = time.time() - t - timings["setup"]
    timings["save"] = fitted.save_seconds
    rel = os.path.relpath(fitted.best_path, run_dir) if fitted.best_path else None
    print(f"finished: {dict(zip(spec.study.metrics, fitted.values))}, checkpoint {rel}", flush=True)
    return TrialOutcome(
        Outcome.COMPLETE, values=fitted.values, checkpoint=rel, timings=timings, warnings=fitted.warnings
    )


def _add_trial_defaults(config: dict[str, Any], namespace: str, run_dir: Path, trial_dir: str) -> None:
    """One folder per trial for logs; no progress bars in worker logs (the user's choice wins)."""
    trainer = config.get("trainer") or {}
    config["trainer"] = trainer
    trainer.setdefault("default_root_dir", str(run_dir / trial_dir))
    trainer.setdefault("enable_progress_bar", False)
    trainer.setdefault("enable_model_summary", False)
    if "logger" not in trainer:
        name, version = os.path.split(trial_dir)
        try:
            import tensorboard  # noqa: F401

            logger = "TensorBoardLogger"
            extra = {"default_hp_metric": False}
        except ImportError:
            logger, extra = "CSVLogger", {}
        trainer["logger"] = {
            "class_path": f"{namespace}.loggers.{logger}",
            "init_args": {"save_dir": str(run_dir), "name": name, "version": version, **extra},
        }


def _versions(namespace: str) -> dict[str, str]:
    """Package versions a trial records (a copy of the process's cached answer)."""
    return dict(_cached_versions(namespace))


@functools.cache
def _cached_versions(namespace: str) -> dict[str, str]:
    # Reading dist-info metadata costs tens of ms a package: the warm process reads it once.
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in (
        "lightstudy",
        "torch",
        "torchvision",
        "lightning",
        "pytorch-lightning",
        "optuna",
        "optuna-integration",
        "torchmetrics",
        "jsonargparse",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    import torch

    out["cuda"] = str(torch.version.cuda)
    out["namespace"] = namespace
    return out


def _checkpoint_epoch(path: str) -> int | None:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return ckpt.get("epoch")


def _describe(e: BaseException) -> str:
    """``ValueError: message (at module.py:12 in function)``, short enough for a trial attr."""
    frames = traceback.extract_tb(e.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"
    message = " ".join(str(e).split()) or "no message"
    text = f"{type(e).__name__}: {message}{where}"
    return text if len(text) <= 1000 else text[:997] + "..."


def _die_with_worker(conn: Any) -> None:
    """Never train on as an orphan: die as soon as nobody can read this trial's result.

    The worker holds the only read end of ``conn``; when it dies (even by SIGKILL) the write end
    reports POLLERR. (PR_SET_PDEATHSIG would watch the warm process, which outlives the worker.)
    """
    import select
    import signal
    import threading

    poller = select.poll()
    poller.register(conn.fileno(), 0)  # no events asked: wakes only on POLLERR/POLLHUP

    def watch() -> None:
        while True:
            if poller.poll(1000):
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="worker-watchdog", daemon=True).start()
