"""``lightstudy run``: start local workers (one per GPU slot, or CPU workers) and watch the study.

Workers are separate ``lightstudy worker`` processes, each in its own session so that a Ctrl-C
reaches the launcher once and is forwarded as one SIGTERM per worker. A worker's output goes to
``<run dir>/workers/worker-<i>.log``; the launcher reads progress from the database, so what it
shows is what every other client sees.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError
from lightstudy.storage import ENV_VAR

if TYPE_CHECKING:
    from rich.console import Console

    from lightstudy.spec import StudySpec

__all__ = ["Launcher", "Slot", "detect_gpus", "plan_slots"]

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


def detect_gpus() -> list[str]:
    """GPU ids this process may use, without initializing CUDA: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def plan_slots(
    gpus: str | None,
    workers: int | None,
    trials_per_gpu: int = 1,
    *,
    gpus_per_trial: int = 1,
    cpu_count: int | None = None,
    detected: list[str] | None = None,
) -> list[Slot]:
    """Decide the workers: ``--gpus 0,1`` (or ``auto``) gives ``trials_per_gpu`` workers per GPU;
    otherwise ``--workers N`` CPU workers; with neither, one worker per GPU found, or one CPU worker.

    Raises:
        LightstudyError: a malformed ``--gpus`` value or non-positive counts.
    """
    cores = cpu_count or os.cpu_count() or 1
    if trials_per_gpu < 1:
        raise LightstudyError(
            f"--trials-per-gpu must be >= 1, but got {trials_per_gpu}", fix="pass --trials-per-gpu 1 or more"
        )
    if workers is not None and workers < 1:
        raise LightstudyError(f"--workers must be >= 1, but got {workers}", fix="pass --workers 1 or more")
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
        threads = max(1, cores // n)
        return [Slot(i, groups[i // trials_per_gpu], threads) for i in range(n)]
    n = workers or 1
    return [Slot(i, None, max(1, cores // n)) for i in range(n)]


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
    ) -> None:
        self.gpus_per_trial = gpus_per_trial
        self.url = url
        self.spec = spec
        self.slots = slots
        self.run_dir = run_dir.resolve()
        self.console = console
        self.processes: list[subprocess.Popen[bytes]] = []
        self._signals = 0
        self._warned: set[str] = set()

    def _start(self) -> None:
        logs = self.run_dir / "workers"
        logs.mkdir(parents=True, exist_ok=True)
        base = dict(os.environ)
        base[ENV_VAR] = self.url  # not in argv: a password would show in `ps`
        base.setdefault("PYTHONUNBUFFERED", "1")
        for slot in self.slots:
            cmd = [
                sys.executable,
                "-m",
                "lightstudy",
                "worker",
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
            log = open(logs / f"worker-{slot.index}.log", "ab")  # noqa: SIM115 (kept for the process)
            self.processes.append(
                subprocess.Popen(cmd, env=slot.env(base), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
            log.close()

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
            self._start()
            self._watch(study, spec)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return LaunchResult([p.returncode for p in self.processes], self._signals > 0)

    def _watch(self, study: Any, spec: StudySpec) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from lightstudy.study import budget, retried_numbers
        from lightstudy.summary import counts, format_value

        total = spec.study.n_trials
        seen: set[int] = set()
        progress = Progress(
            TextColumn("[bold]{task.fields[name]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=self.console,
            disable=not _live_bar(self.console),
        )
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
                )
                if not alive:
                    break
                time.sleep(REFRESH)

    def _line(self, t: Any, spec: StudySpec, retried: bool) -> str:
        from lightstudy.summary import format_value

        state = t.state.name.lower()
        colour = {"complete": "green", "pruned": "yellow", "fail": "red"}.get(state, "white")
        if t.user_attrs.get("interrupted"):
            state, colour = "handed back", "cyan"
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
