"""``lightstudy run``: start local workers (one per GPU slot, or CPU workers) and watch the study.

Workers are separate ``lightstudy worker`` processes, each in its own session so that a Ctrl-C
reaches the launcher once and is forwarded as one SIGTERM per worker. Where this process has no
other thread (the ``lightstudy run`` command), they are forked from it once it has imported what
a worker needs (:class:`ForkedWorker`), so N workers cost one import of Optuna and SQLAlchemy,
not N; elsewhere (a notebook's kernel has threads) each is a new interpreter. They share one warm
process (:mod:`lightstudy.warmserver`, started by :func:`lightstudy.api.run`; its address in
``$LIGHTSTUDY_WARM``) that has torch, Lightning and the study's classes imported and forks
every worker's trial processes, so N workers start in the time of one. A worker's output goes
to ``<run dir>/workers/worker-<i>.log`` (the warm process's to ``warm.log``); the launcher reads
progress from the database, so what it shows is what every other client sees.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import runpy
import select
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy import gpu_share, packing
from lightstudy.devices import detect_gpus
from lightstudy.errors import LightstudyError
from lightstudy.exiting import exit_without_teardown
from lightstudy.storage import ENV_VAR

if TYPE_CHECKING:
    from rich.console import Console

    from lightstudy.spec import StudySpec
    from lightstudy.warmserver import WarmServer

__all__ = ["ForkedWorker", "Launcher", "Slot", "added_slots", "can_fork", "detect_gpus", "plan_slots", "progress_bar"]

REFRESH = 1.0  # seconds between progress updates read from the database


@dataclass(frozen=True)
class Slot:
    """One worker: the GPU(s) it sees (None: CPU only) and its torch threads."""

    index: int
    gpu: str | None
    threads: int

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        env["CUDA_VISIBLE_DEVICES"] = self.gpu if self.gpu is not None else ""
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(self.threads)
        return env


def plan_slots(
    gpus: str | None,
    workers: int | None,
    trials_per_gpu: int | str = 1,
    *,
    gpus_per_trial: int = 1,
    cpu_count: int | None = None,
    detected: list[str] | None = None,
    threads: int | None = None,
) -> list[Slot]:
    """Decide the workers: ``--gpus 0,1`` (or ``auto``) gives ``trials_per_gpu`` workers per GPU;
    otherwise ``--workers N`` CPU workers; with neither, one worker per GPU found, or one CPU worker.
    Each gets ``threads`` torch threads, or the cores split between them.
    ``trials_per_gpu="auto"`` starts one per GPU: the launcher adds more once a trial's peak
    memory is measured (:mod:`lightstudy.packing`).

    Raises:
        LightstudyError: a malformed ``--gpus`` value or non-positive counts.
    """
    cores = cpu_count or os.cpu_count() or 1
    trials_per_gpu = trials_per_gpu_count(trials_per_gpu) or 1
    if workers is not None and workers < 1:
        raise LightstudyError(f"--workers must be >= 1, but got {workers}", fix="pass --workers 1 or more")
    if threads is not None and threads < 1:
        raise LightstudyError(f"--threads must be >= 1, but got {threads}", fix="pass --threads 1 or more")
    ids: list[str]
    if gpus is None and workers is None:
        ids = detected if detected is not None else detect_gpus()
    elif gpus is None:
        ids = []
    elif gpus.strip().lower() == "auto":
        ids = detected if detected is not None else detect_gpus()
    else:
        ids = [g.strip() for g in gpus.split(",")]
        if not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
            raise LightstudyError(
                f"--gpus must be 'auto' or distinct GPU indices like 0,1,2, but got {gpus!r}",
                fix="e.g. --gpus 0,1 (see nvidia-smi -L)",
            )
    if ids:
        # A multi-device trial gets its own group of GPUs; K workers share each group.
        groups = [
            ",".join(ids[i : i + gpus_per_trial]) for i in range(0, len(ids) - gpus_per_trial + 1, gpus_per_trial)
        ]
        if not groups:
            raise LightstudyError(
                f"a trial runs on {gpus_per_trial} GPUs but only {len(ids)} are given ({','.join(ids)})",
                fix=f"pass at least {gpus_per_trial} GPUs with --gpus, or lower trainer.devices",
            )
        n = len(groups) * trials_per_gpu
        return [Slot(i, groups[i // trials_per_gpu], threads or max(1, cores // n)) for i in range(n)]
    n = workers or 1
    return [Slot(i, None, threads or max(1, cores // n)) for i in range(n)]


def added_slots(
    slots: list[Slot], gpu: str, n: int, *, threads: int | None = None, cpu_count: int | None = None
) -> list[Slot]:
    """``n`` more workers on ``gpu`` beside ``slots`` (GPU packing): ``threads`` torch threads each,
    or the cores split between all of them."""
    cores = cpu_count or os.cpu_count() or 1
    each = threads or max(1, cores // (len(slots) + n))
    return [Slot(len(slots) + i, gpu, each) for i in range(n)]


def trials_per_gpu_count(value: int | str) -> int | None:
    """``--trials-per-gpu``: a count, or None for ``auto``.

    Raises:
        LightstudyError: neither a positive count nor ``auto``.
    """
    try:
        return packing.parse_trials_per_gpu(value)
    except ValueError as e:
        raise LightstudyError(str(e), fix="pass --trials-per-gpu 1 or more, or auto") from None


@dataclass
class LaunchResult:
    exit_codes: list[int | None] = field(default_factory=list)
    interrupted: bool = False


class Launcher:
    """Starts the workers of ``slots`` and shows progress until they all exit."""

    def __init__(
        self,
        url: str,
        spec: StudySpec,
        slots: list[Slot],
        run_dir: Path,
        console: Console,
        gpus_per_trial: int | None = None,
        packing: bool = False,
        warm: WarmServer | None = None,
        threads: int | None = None,
    ) -> None:
        self.gpus_per_trial = gpus_per_trial
        self.threads = threads  # run --threads: each added worker's too (None: the cores split)
        self.packing = packing  # --trials-per-gpu auto: add workers per GPU as measured (_pack)
        self._planned: dict[str, Any] = {}  # GPU -> its packing.Plan, once made
        self.warm = warm  # the warm process the workers share (None: each starts its own)
        self.url = url
        self.spec = spec
        self.slots = slots
        self.run_dir = run_dir.resolve()
        self.console = console
        self.processes: list[Any] = []  # subprocess.Popen or ForkedWorker: the same calls
        self._signals = 0
        self._warned: set[str] = set()

    def start(self) -> None:
        """Start the workers, each waiting for :meth:`go` (the study exists) or :meth:`cancel`.

        Forked (:func:`can_fork`): from this process, with what it has imported (``lightstudy
        run`` loads Optuna, SQLAlchemy and the storage's schema first, while the warm process
        imports torch: :func:`lightstudy.api.run`; what is not there yet a worker imports
        itself). Otherwise each is ``python -m lightstudy.launched``, which imports it meanwhile."""
        logs = self.run_dir / "workers"
        logs.mkdir(parents=True, exist_ok=True)
        base = dict(os.environ)
        base[ENV_VAR] = self.url  # not in argv: a password would show in `ps`
        base.setdefault("PYTHONUNBUFFERED", "1")
        if self.warm is not None:
            base.update(self.warm.environment())
        fork = can_fork() and not self.processes  # added workers (GPU packing) are spawned
        for slot in self.slots:
            args = [
                "--study",
                self.spec.study.name,
                "--run-dir",
                str(self.run_dir),
                "--threads",
                str(slot.threads),
                "--gpu",
                slot.gpu if slot.gpu is not None else "cpu",
                *(["--gpus-per-trial", str(self.gpus_per_trial)] if self.gpus_per_trial else []),
            ]
            with open(logs / f"worker-{slot.index}.log", "ab") as log:
                if fork:
                    inherited = [fd for p in self.processes for fd in p.fds()]
                    self.processes.append(ForkedWorker(args, slot.env(base), log.fileno(), inherited))
                    continue
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "lightstudy.launched", *args],  # `lightstudy worker` once told go
                        env=slot.env(base),
                        stdin=subprocess.PIPE,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def go(self) -> None:
        """The study exists: the waiting workers start claiming trials."""
        self._tell_workers(b"go\n")

    def cancel(self) -> None:
        """The run will not go (a bad spec, an interrupt): the waiting workers exit without a word."""
        self._tell_workers(b"")
        for proc in self.processes:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def _tell_workers(self, line: bytes) -> None:
        for proc in self.processes:
            if proc.stdin is not None and not proc.stdin.closed:
                with contextlib.suppress(OSError):
                    proc.stdin.write(line)
                    proc.stdin.close()

    # --- GPU packing (lightstudy.packing) ------------------------------------------------------

    def _share_gpus(self) -> None:
        """Each GPU's plan for its trials: K workers (fixed) or, with ``auto``, to be measured."""
        gpu_share.clear(self.run_dir)  # a plan of an earlier run means nothing now
        groups: dict[str, int] = {}
        for slot in self.slots:
            if slot.gpu is not None:
                groups[slot.gpu] = groups.get(slot.gpu, 0) + 1
        for gpu, n in groups.items():
            state = gpu_share.GpuState(gpu, self.packing, None if self.packing else n, None, os.getpid())
            gpu_share.write_state(self.run_dir, state)

    def _pack(self, trials: list[Any]) -> None:
        """``auto``: once a GPU's first trial recorded its peak memory, plan it and add its workers."""
        for gpu in dict.fromkeys(s.gpu for s in self.slots if s.gpu is not None):
            if gpu in self._planned:
                continue
            records = [
                t.user_attrs[packing.MEMORY_ATTR]
                for t in sorted(trials, key=lambda t: t.number)
                # a failed trial may have stopped before its peak: complete and pruned ones say it
                if t.state.name in ("COMPLETE", "PRUNED")
                and t.user_attrs.get("gpu") == gpu
                and packing.MEMORY_ATTR in t.user_attrs
            ]
            plan = packing.plan_from_records(records)
            if plan is None:
                continue
            self._planned[gpu] = plan
            gpu_share.write_state(self.run_dir, gpu_share.GpuState(gpu, True, plan.slots, plan.fraction, os.getpid()))
            running = sum(s.gpu == gpu for s in self.slots)
            cap = f", each capped at {plan.fraction:.0%} of its memory" if plan.fraction is not None else ""
            self.console.print(
                f"GPU {gpu}: a trial needs {packing.gib(plan.need)} of {packing.gib(plan.usable)} usable: "
                f"{plan.slots} trial(s) at once{cap}"
            )
            self._add_workers(gpu, plan.slots - running)

    def _add_workers(self, gpu: str, n: int) -> None:
        """Start ``n`` more workers on ``gpu`` (beside :meth:`_start`'s, with the same command)."""
        if n <= 0:
            return
        added = added_slots(self.slots, gpu, n, threads=self.threads)
        before, self.slots = self.slots, added
        try:
            self.start()  # starts self.slots: only the added ones
        finally:
            self.slots = before + added
        self.go()  # only the added ones still wait for the word

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGTERM)

    def run(self) -> LaunchResult:
        from lightstudy.storage import open_storage
        from lightstudy.study import load_study

        storage = open_storage(self.url, create=False)
        study, spec = load_study(self.url, self.spec.study.name, storage=storage)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._share_gpus()
            if not self.processes:
                self.start()
            self.go()
            self._watch(study, spec)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            gpu_share.clear(self.run_dir)
        return LaunchResult([p.returncode for p in self.processes], self._signals > 0)

    def _watch(self, study: Any, spec: StudySpec) -> None:
        from lightstudy.study import budget, retried_numbers
        from lightstudy.summary import counts, format_value

        total = spec.study.n_trials
        seen: set[int] = set()
        progress = progress_bar(self.console)
        with progress:
            task = progress.add_task("starting workers", total=total, name=spec.study.name)
            while True:
                alive = any(p.poll() is None for p in self.processes)
                trials = study.get_trials(deepcopy=False)
                retried = retried_numbers(trials)
                for t in trials:
                    if t.state.is_finished() and t.number not in seen:
                        seen.add(t.number)
                        self.console.print(self._line(t, spec, t.number in retried))
                if self.packing and not self._signals:
                    self._pack(trials)
                c = counts(trials)
                best = _best_value(study, spec)
                used = budget(trials, spec).used - c["running"] - c["waiting"]
                progress.update(
                    task,
                    completed=used,
                    description=(
                        f"best {format_value(best)} · running {c['running']} · pruned {c['pruned']} · "
                        f"failed {c['fail']}"
                    ),
                    refresh=not progress.live.auto_refresh,  # Jupyter: refreshed here (progress_bar)
                )
                if not alive:
                    break
                # Until the next refresh, or at once when the worker waited on exits (the last one
                # ends the run: no second lost to a sleep).
                running = next((p for p in self.processes if p.poll() is None), None)
                if running is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        running.wait(REFRESH)

    def _line(self, t: Any, spec: StudySpec, retried: bool) -> str:
        from lightstudy.summary import format_value

        state = t.state.name.lower()
        colour = {"complete": "green", "pruned": "yellow", "fail": "red"}.get(state, "white")
        if t.user_attrs.get("interrupted"):
            state, colour = "handed back", "cyan"
        elif t.user_attrs.get(packing.RETRIED_ALONE_ATTR):
            state = "oom→alone"
        elif retried:
            state = "fail→retry"
        seconds = t.duration.total_seconds() if t.duration else 0.0
        text = f"trial {t.number:>4} [{colour}]{state:<11}[/{colour}]"
        if t.values is not None:
            text += " " + " ".join(f"{m}={format_value(v)}" for m, v in zip(spec.study.metrics, t.values))
        text += " " + " ".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in t.params.items())
        text += f" ({seconds:.1f}s)"
        if t.state.name == "FAIL":
            text += f"\n           {t.user_attrs.get('fail_reason', 'worker died (heartbeat stale)')}"
        for warning in t.user_attrs.get("warnings", []):
            if warning not in self._warned:  # once per study, not once per trial
                self._warned.add(warning)
                text += f"\n           [yellow]warning:[/yellow] {warning}"
        return text


def can_fork() -> bool:
    """Whether workers may be forked from this process: it has no other thread (a thread's lock
    held at the fork would stay held in the child), and the platform can wait on a child's pid
    with a timeout (``os.pidfd_open``: Linux). ``lightstudy run`` forks; a notebook's kernel, a
    test runner's process or anything that started a thread spawns."""
    return hasattr(os, "fork") and hasattr(os, "pidfd_open") and threading.active_count() == 1


class ForkedWorker:
    """A ``python -m lightstudy.launched ARGS`` (or another ``module``) forked from this process
    instead of started anew:
    what :class:`Launcher` uses of a ``subprocess.Popen`` (``stdin``, ``poll``, ``wait``,
    ``send_signal``, ``kill``, ``returncode``), with the same environment, session, output and
    exit code as the spawned one.

    The child runs :mod:`lightstudy.launched` as ``-m`` would, with its own ``atexit`` handlers
    only, and ends with ``os._exit`` (nothing of this process's is torn down twice). It keeps
    this process's other descriptors but ``inherited`` (the earlier workers' pipes, which must
    reach end-of-file when this process closes them): among them the warm process's stdin, so the
    warm process stays while a worker that forks trials there lives.
    """

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_fd: int,
        inherited: list[int],
        module: str = "lightstudy.launched",
    ) -> None:
        read, write = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # else the child would write this process's pending output again
        pid = os.fork()
        if pid == 0:
            os.close(write)
            _forked_main(module, args, env, read, log_fd, inherited)  # never returns
        os.close(read)
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self.stdin = open(write, "wb", buffering=0)  # noqa: SIM115 (closed by go or cancel)
        self._pidfd = os.pidfd_open(pid)

    def fds(self) -> list[int]:
        """This process's descriptors of the worker, which a later fork must not keep open."""
        return [self._pidfd] + ([] if self.stdin.closed else [self.stdin.fileno()])

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._exited(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit code, once the worker has exited (at most ``timeout`` seconds from now).

        Raises:
            subprocess.TimeoutExpired: it is still running after ``timeout`` seconds.
        """
        if self.returncode is None:
            ready, _, _ = select.select([self._pidfd], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self._exited(os.waitpid(self.pid, 0)[1])
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:  # unreaped, its pid cannot be another process's
            signal.pidfd_send_signal(self._pidfd, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _exited(self, status: int) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        os.close(self._pidfd)


def _forked_main(
    module: str, args: list[str], env: dict[str, str], stdin: int, log_fd: int, inherited: list[int]
) -> None:
    """The forked worker's side: what ``Popen(start_new_session=True, stdin=PIPE, stdout=log,
    stderr=STDOUT, env=env)`` and ``python -m MODULE ARGS`` would set up, then the module; the
    exit as Python's, without its teardown (:func:`lightstudy.exiting.exit_without_teardown`)."""
    atexit._clear()  # this process's handlers are the launcher's (no public name; typeshed lists it)
    code = 1
    try:
        os.setsid()  # a Ctrl-C reaches the launcher only, as for a spawned worker
        for fd in inherited:
            os.close(fd)
        os.dup2(stdin, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(stdin)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (a log: line by line)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["-m", *args]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    exit_without_teardown(code)


def progress_bar(console: Console) -> Any:
    """The run's live bar (rich ``Progress``), off where :func:`_live_bar` says so.

    In Jupyter it is refreshed only by the watch loop, between its own lines, never by rich's
    refresh thread: that thread redraws inside the bar's ipywidgets ``Output`` context, and a
    trial's line printed meanwhile went into the widget, whose next redraw cleared it (a
    notebook lost "trial 0 complete" now and then).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.fields[name]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        disable=not _live_bar(console),
        auto_refresh=not console.is_jupyter,
    )


def _live_bar(console: Console) -> bool:
    """A live progress bar in a terminal, and in Jupyter where ipywidgets renders it (rich's
    Jupyter display is an ipywidgets Output); elsewhere, and without ipywidgets, a line per trial."""
    if console.is_terminal:
        return True
    if not console.is_jupyter:
        return False
    import importlib.util

    return importlib.util.find_spec("ipywidgets") is not None


def _best_value(study: Any, spec: StudySpec) -> Any:
    if spec.study.is_multi_objective:
        return None
    try:
        return study.best_value
    except ValueError:
        return None
