"""GPU packing by measured memory (``lightstudy run --trials-per-gpu auto``).

How it works (issue 14):

1. The launcher starts one worker per GPU. That worker's first trial runs alone; its process
   (never the worker or the launcher: they must not initialize CUDA) records, as the trial's user
   attr ``gpu_memory``, ``torch.cuda.max_memory_allocated`` and the GPU's total and free memory
   (``torch.cuda.mem_get_info``), read after training.
2. The launcher reads that attr from the study, asks :func:`decide` how many trials fit, writes
   the GPU's plan (:class:`GpuState`) into ``<run dir>/packing/`` and starts the extra workers:
   1 → k workers on that GPU. Each later trial caps itself at the plan's ``fraction`` with
   ``torch.cuda.set_per_process_memory_fraction``, so a configuration that needs more than its
   share runs out of memory itself instead of taking its neighbours down.
3. A trial that runs out of GPU memory beside others (``torch.cuda.OutOfMemoryError``, or a
   packed trial process killed by SIGKILL, the kernel's OOM killer) is retried *alone*: the
   worker marks its lineage's folder (:data:`ALONE_MARK`) and requeues it without using up
   ``max_retry``. The retry takes the GPU's gate: the other slots start no trial until it ends,
   and it starts once the trials already running there are done (file locks, below). One that
   runs out of memory even alone fails with that reason.

Workers are added by the launcher, not trials by a worker: each worker stays the one-trial loop
it always was (claim, prepare, run, record), and claims, heartbeats and retries are unchanged.

The margin, computed by :func:`decide` from the largest measured peak ``p`` (of the first
:data:`PROBE_TRIALS` measured trials of that GPU), its total memory ``T`` and ``A``, the memory
other programs leave (the measured trial's free memory after training plus what it held itself)::

    need     = p * HEADROOM + CONTEXT_BYTES            # a trial: its peak, 25% more, its CUDA context
    usable   = min(T * SAFETY, A)                      # 90% of the GPU, less what others hold
    k        = clamp(floor(usable / need), 1, MAX_PER_GPU)
    fraction = (usable / k - CONTEXT_BYTES) / T        # each trial's allocator cap: its share

The top half of this module is pure (no torch, no files): the unit tests run it without training.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ALONE_MARK",
    "CONTEXT_BYTES",
    "FAKE_VAR",
    "HEADROOM",
    "MAX_PER_GPU",
    "MEMORY_ATTR",
    "PROBE_TRIALS",
    "SAFETY",
    "GpuState",
    "Plan",
    "TrialMemory",
    "decide",
    "is_out_of_memory",
    "parse_trials_per_gpu",
]

HEADROOM = 1.25  # a trial's measured peak times this: allocator fragmentation, other configurations
CONTEXT_BYTES = 512 * 2**20  # a CUDA context per trial process, which torch's allocator does not count
SAFETY = 0.90  # at most this share of the GPU's memory goes to trials (the driver, other programs)
MAX_PER_GPU = 8  # never more trials on one GPU (each is a process with CPU work of its own)
PROBE_TRIALS = 1  # measured trials of a GPU before its plan is made
DECISION_WAIT = 60.0  # seconds a trial waits for the launcher's plan after its GPU was measured

MEMORY_ATTR = "gpu_memory"  # the trial's user attr: what it measured (see TrialMemory)
RETRIED_ALONE_ATTR = "retried_alone"  # user attr of an attempt out of GPU memory beside others
FREE_RETRIES_ATTR = "lightstudy.free_retries"  # system attr: retries max_retry does not count (OOM)
ALONE_MARK = "run-alone"  # file in a lineage's folder: its next attempt runs alone on its GPU
FAKE_VAR = "LIGHTSTUDY_FAKE_GPU_MEMORY"  # the tests' stand-in for the CUDA probe (see FakeProbe)
OOM_KILLER_HINT = "OOM killer"  # in ranks.exit_reason's text for a SIGKILLed trial process


# --- the decision (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one GPU is shared: ``slots`` trials at once, each capped at ``fraction`` of its memory."""

    slots: int
    fraction: float | None  # None: uncapped (one trial)
    need: int  # bytes one trial is given room for
    usable: int  # bytes all trials together may use


def decide(peaks: list[int], total: int, available: int | None = None, *, max_per_gpu: int = MAX_PER_GPU) -> Plan:
    """How many trials fit on a GPU of ``total`` bytes whose measured trials peaked at ``peaks``.

    ``available``: the bytes other programs leave to trials (None: all of it).
    """
    if not peaks or total <= 0:
        raise ValueError("decide needs at least one measured peak and the GPU's total memory")
    peak = max(peaks)
    need = math.ceil(peak * HEADROOM) + CONTEXT_BYTES
    usable = int(total * SAFETY)
    if available is not None:
        usable = min(usable, available)
    slots = max(1, min(max_per_gpu, usable // need))
    if slots == 1:
        return Plan(1, None, need, usable)
    fraction = (usable / slots - CONTEXT_BYTES) / total
    return Plan(slots, round(fraction, 4), need, usable)


def plan_from_records(records: list[dict[str, Any]], *, max_per_gpu: int = MAX_PER_GPU) -> Plan | None:
    """The plan from trials' :data:`MEMORY_ATTR` records (None until :data:`PROBE_TRIALS` are measured).

    Records of trials that ran out of memory say nothing about what a trial needs and are skipped.
    """
    usable = [r for r in records if r.get("peak") is not None and r.get("total") and not r.get("oom")]
    if len(usable) < PROBE_TRIALS:
        return None
    first = usable[:PROBE_TRIALS]
    # free after training, plus the trial's own held memory and context: what others leave
    left = [int(r["free"]) + int(r.get("reserved") or r["peak"]) + CONTEXT_BYTES for r in first if "free" in r]
    available = min(left, default=None)
    return decide([int(r["peak"]) for r in first], int(first[0]["total"]), available, max_per_gpu=max_per_gpu)


def parse_trials_per_gpu(value: int | str) -> int | None:
    """``--trials-per-gpu``: a count, or ``auto`` (None: packed by measured memory).

    Raises:
        ValueError: neither a positive count nor ``auto`` (the launcher turns it into one line).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return None
        if not text.isdigit():
            raise ValueError(f"--trials-per-gpu must be a count like 2 or 'auto', but got {value!r}")
        value = int(text)
    if value < 1:
        raise ValueError(f"--trials-per-gpu must be >= 1 or 'auto', but got {value}")
    return value


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error (``torch.cuda.OutOfMemoryError``, or its text in a wrapper)."""
    return any(type(e).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(e) for e in _chain(error))


def died_of_memory(reason: str | None) -> bool:
    """A trial process killed by SIGKILL, as the kernel's OOM killer kills (ranks.exit_reason)."""
    return reason is not None and "SIGKILL" in reason and OOM_KILLER_HINT in reason


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in seen and len(seen) < 10:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


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
        from lightstudy.callbacks import stop_requested

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

    def outcome(self, error: BaseException, timings: dict[str, float]) -> Any:
        """The outcome of a trial that ran out of GPU memory: OUT_OF_MEMORY (retried alone) when
        it shared its GPU, else FAILED with the reason (it ran out of memory on its own)."""
        from lightstudy.trial import Outcome, TrialOutcome, _describe

        state = read_state(self.job.run_dir, self.gpu)
        why = _describe(error)
        if state is not None and state.packed and not self.alone:
            return TrialOutcome(Outcome.OUT_OF_MEMORY, reason=f"{why}; retried alone", timings=timings)
        if state is not None:  # it had the GPU to itself: the configuration does not fit
            alone = "even alone " if self.alone else "alone "
            why = f"out of GPU memory {alone}on GPU {self.gpu} (the configuration does not fit it): {why}"
        return TrialOutcome(Outcome.FAILED, reason=why, timings=timings)
