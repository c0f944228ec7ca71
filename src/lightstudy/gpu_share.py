"""Acting on a GPU's packing plan (:mod:`lightstudy.packing` decides it): the plan files the
launcher writes in ``<run dir>/packing/``, the GPU's gate (who may run on it now), and, in the
trial process, the memory probe, the cap and the peak it records (:class:`TrialMemory`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightstudy.packing import ALONE_MARK, FAKE_VAR, MEMORY_ATTR, gib, is_out_of_memory

__all__ = ["CudaProbe", "FakeProbe", "Gate", "GpuState", "TrialMemory", "clear", "read_state", "write_state"]

DECISION_WAIT = 60.0  # seconds a trial waits for the launcher's plan after its GPU was measured


# --- the GPU's plan and gate, in <run dir>/packing/ (launcher writes, trials read) ---------------


@dataclass(frozen=True)
class GpuState:
    """The launcher's plan for one GPU (a ``CUDA_VISIBLE_DEVICES`` value), as the trials read it.

    ``slots`` None: ``auto`` and not decided yet. ``launcher``: its pid; a state whose launcher
    is gone is ignored (a killed launcher must not cap a later ``lightstudy worker``'s trials).
    """

    gpu: str
    auto: bool
    slots: int | None
    fraction: float | None
    launcher: int

    @property
    def packed(self) -> bool:
        return (self.slots or 1) > 1


def packing_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "packing"


def _key(gpu: str) -> str:
    return "gpu-" + gpu.replace(",", "-")


def write_state(run_dir: str | Path, state: GpuState) -> None:
    folder = packing_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{_key(state.gpu)}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, folder / f"{_key(state.gpu)}.json")  # atomic: a trial never reads half a plan


def read_state(run_dir: str | Path, gpu: str | None) -> GpuState | None:
    """The plan of ``gpu`` written by a launcher that is still running, else None."""
    if not gpu:
        return None
    try:
        state = GpuState(**json.loads((packing_dir(run_dir) / f"{_key(gpu)}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    try:
        os.kill(state.launcher, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return state


def clear(run_dir: str | Path) -> None:
    """Remove every GPU's plan, gate and marks (the launcher's start and end)."""
    folder = packing_dir(run_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()


def mark_measured(run_dir: str | Path, gpu: str) -> None:
    folder = packing_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{_key(gpu)}.measured").touch()


def measured(run_dir: str | Path, gpu: str) -> bool:
    return (packing_dir(run_dir) / f"{_key(gpu)}.measured").exists()


def mark_alone(lineage_dir: Path, why: str) -> None:
    """The lineage's next attempt runs alone on its GPU (the worker, after an out-of-memory attempt)."""
    lineage_dir.mkdir(parents=True, exist_ok=True)
    (lineage_dir / ALONE_MARK).write_text(why + "\n")


def runs_alone(lineage_dir: Path) -> bool:
    return (lineage_dir / ALONE_MARK).exists()


class Gate:
    """Who may run on a GPU now, with two ``flock`` files (released by the kernel when a process dies).

    A packed trial passes the turnstile (``.gate``, exclusive, at once released) and holds
    ``.lock`` shared while it runs. A trial that runs alone holds the turnstile, so no new trial
    starts, and waits for ``.lock`` exclusive, so the ones running finish first.
    """

    def __init__(self, run_dir: str | Path, gpu: str) -> None:
        folder = packing_dir(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self._gate = os.open(folder / f"{_key(gpu)}.gate", os.O_RDWR | os.O_CREAT, 0o644)
        self._lock = os.open(folder / f"{_key(gpu)}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def enter(self, alone: bool) -> float:
        """Block until this trial may run; the seconds it waited."""
        start = time.monotonic()
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        if alone:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        else:
            fcntl.flock(self._lock, fcntl.LOCK_SH)
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        return time.monotonic() - start

    def close(self) -> None:
        for fd in (self._lock, self._gate):
            with contextlib.suppress(OSError):
                # unlocked first: a forked child (a DataLoader worker) holding a copy of the fd
                # would otherwise keep the lock after this close
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


# --- in the trial process: measure, cap, run alone ---------------------------------------------


class CudaProbe:
    """The real probe: torch.cuda in the trial process (where CUDA belongs)."""

    def cap(self, fraction: float) -> None:
        import torch

        torch.cuda.set_per_process_memory_fraction(fraction)

    def measure(self) -> dict[str, int] | None:
        """Peak and the GPU's memory after training; None if the trial never initialized CUDA."""
        import torch

        if not torch.cuda.is_initialized():
            return None
        free, total = torch.cuda.mem_get_info()
        return {
            "peak": int(torch.cuda.max_memory_allocated()),
            "reserved": int(torch.cuda.max_memory_reserved()),
            "total": int(total),
            "free": int(free),
        }

    def check(self) -> None:
        """Nothing: a real GPU raises torch.cuda.OutOfMemoryError itself."""


class FakeProbe:
    """The stand-in for tests on the CPU, from ``$LIGHTSTUDY_FAKE_GPU_MEMORY`` (JSON)::

        {"total": 10737418240, "peak": 3221225472, "param": "model.init_args.hidden", "peaks": {"48": 5368709120}}

    A trial "peaks" at ``peaks[str(its value of param)]`` or ``peak`` bytes of a ``total``-byte GPU
    and, capped at a fraction too small for that, raises ``torch.cuda.OutOfMemoryError`` after
    training, as a real capped allocator would during it.
    """

    def __init__(self, text: str, params: dict[str, Any]) -> None:
        conf = json.loads(text)
        self.total = int(conf["total"])
        value = params.get(conf["param"]) if conf.get("param") else None
        self.peak = int((conf.get("peaks") or {}).get(str(value), conf["peak"]))
        self.fraction: float | None = None

    def cap(self, fraction: float) -> None:
        self.fraction = fraction

    def measure(self) -> dict[str, int] | None:
        return {"peak": self.peak, "reserved": self.peak, "total": self.total, "free": self.total - self.peak}

    def check(self) -> None:
        if self.fraction is not None and self.peak > self.fraction * self.total:
            import torch

            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (stand-in): the trial needs {gib(self.peak)}, "
                f"capped at {gib(self.fraction * self.total)}"
            )


class TrialMemory:
    """Around one trial's training: wait for its turn on the GPU, cap its memory, record its peak.

    Inactive (records the peak only, if the trial used CUDA) without a launcher's plan for the
    trial's ``CUDA_VISIBLE_DEVICES``. Its outcome for an out-of-memory error: see :meth:`outcome`.
    """

    def __init__(self, job: Any, trial: Any) -> None:
        self.job = job
        self.trial = trial
        self.gpu = os.environ.get("CUDA_VISIBLE_DEVICES") or None
        fake = os.environ.get(FAKE_VAR)
        self.probe: Any = FakeProbe(fake, job.params) if fake else CudaProbe()
        self.lineage = Path(job.run_dir) / job.trial_dir
        self.alone = False
        self.fraction: float | None = None
        self.waited = 0.0
        self.started = time.time()
        self._gate: Gate | None = None

    def __enter__(self) -> TrialMemory:
        state = read_state(self.job.run_dir, self.gpu)
        if state is None or self.gpu is None or self.job.rank != 0:
            return self
        if state.auto and state.slots is None and measured(self.job.run_dir, self.gpu):
            state = self._wait_for_plan(state)
        self.alone = runs_alone(self.lineage)
        self._gate = Gate(self.job.run_dir, self.gpu)
        self.waited = self._gate.enter(self.alone)
        self.started = time.time()
        if self.waited > 1:
            print(f"waited {self.waited:.1f}s for GPU {self.gpu} (a trial ran alone there)", flush=True)
        if not self.alone and state.fraction is not None:
            self.fraction = state.fraction
            self.probe.cap(state.fraction)
        if self.alone:
            print(f"running alone on GPU {self.gpu} (the last attempt ran out of memory beside others)", flush=True)
        return self

    def _wait_for_plan(self, state: GpuState) -> GpuState:
        """The launcher's plan, once the GPU's measured trial has recorded its peak (not before
        its share is known does a trial start beside others); a stop request ends the wait."""
        from lightstudy.stopping import stop_requested

        end = time.monotonic() + DECISION_WAIT
        while time.monotonic() < end and not stop_requested():
            now = read_state(self.job.run_dir, self.gpu)
            if now is None or now.slots is not None:
                return now or state
            time.sleep(0.2)
        return state

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            oom = exc is not None and is_out_of_memory(exc)
            # what the launcher plans from (complete and pruned trials: they ran to their peak)
            telling = exc is None or type(exc).__name__ == "TrialPruned"
            if exc is None:
                try:
                    self.probe.check()
                except BaseException as e:
                    oom = is_out_of_memory(e)
                    self._record(oom, False)
                    raise
            self._record(oom, telling and not oom)
        finally:
            if self._gate is not None:
                self._gate.close()

    def _record(self, oom: bool, telling: bool) -> None:
        """The trial's ``gpu_memory`` attr (``telling``: one the launcher plans from, so later
        trials wait for that plan); a failure to read or record it is printed, never raised (it
        would replace the trial's own outcome)."""
        try:
            self._measure_and_record(oom, telling)
        except Exception as e:
            print(f"could not record the trial's GPU memory: {type(e).__name__}: {e}", flush=True)

    def _measure_and_record(self, oom: bool, telling: bool) -> None:
        from lightstudy.storage import record_attr

        if self.job.rank != 0:
            return
        found = self.probe.measure()
        if found is None:
            return
        record = {**found, "fraction": self.fraction, "alone": self.alone, "oom": oom, "gpu": self.gpu}
        record["ran"] = [round(self.started, 3), round(time.time(), 3)]  # after its turn on the GPU came
        if self.waited:
            record["waited"] = round(self.waited, 3)
        record_attr(self.trial, MEMORY_ATTR, record)
        if telling and self.gpu is not None and read_state(self.job.run_dir, self.gpu) is not None:
            mark_measured(self.job.run_dir, self.gpu)

    @staticmethod
    def is_out_of_memory(error: BaseException) -> bool:
        return is_out_of_memory(error)

    def out_of_memory(self, why: str) -> tuple[bool, str]:
        """A trial that ran out of GPU memory (``why``: the error, described): (retry it alone,
        the reason to record). Retried alone when it shared its GPU; else it ran out of memory on
        its own and fails: the configuration does not fit."""
        state = read_state(self.job.run_dir, self.gpu)
        if state is not None and state.packed and not self.alone:
            return True, f"{why}; retried alone"
        if state is not None:  # it had the GPU to itself: the configuration does not fit
            alone = "even alone " if self.alone else "alone "
            why = f"out of GPU memory {alone}on GPU {self.gpu} (the configuration does not fit it): {why}"
        return False, why
