"""GPU packing by measured memory (``lightstudy run --trials-per-gpu auto``).

How it works (issue 14):

1. The launcher starts one worker per GPU. That worker's first trial runs alone; its process
   (never the worker or the launcher: they must not initialize CUDA) records, as the trial's user
   attr ``gpu_memory``, ``torch.cuda.max_memory_allocated`` and the GPU's total and free memory
   (``torch.cuda.mem_get_info``), read after training.
2. The launcher reads that attr from the study, asks :func:`decide` how many trials fit, writes
   the GPU's plan (:class:`~lightstudy.gpu_share.GpuState`) into ``<run dir>/packing/`` and starts the extra workers:
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

This module is the decision, pure (no torch, no files): the unit tests run it without training.
What acts on it (the plan files, the GPU's gate, the probe and cap in the trial process) is
:mod:`lightstudy.gpu_share`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    "Plan",
    "decide",
    "is_out_of_memory",
    "parse_trials_per_gpu",
]

HEADROOM = 1.25  # a trial's measured peak times this: allocator fragmentation, other configurations
CONTEXT_BYTES = 512 * 2**20  # a CUDA context per trial process, which torch's allocator does not count
SAFETY = 0.90  # at most this share of the GPU's memory goes to trials (the driver, other programs)
MAX_PER_GPU = 8  # never more trials on one GPU (each is a process with CPU work of its own)
PROBE_TRIALS = 1  # measured trials of a GPU before its plan is made

MEMORY_ATTR = "gpu_memory"  # the trial's user attr: what it measured (see TrialMemory)
RETRIED_ALONE_ATTR = "retried_alone"  # user attr of an attempt out of GPU memory beside others
FREE_RETRIES_ATTR = "lightstudy.free_retries"  # system attr: retries max_retry does not count (OOM)
ALONE_MARK = "run-alone"  # file in a lineage's folder: its next attempt runs alone on its GPU
FAKE_VAR = "LIGHTSTUDY_FAKE_GPU_MEMORY"  # the tests' stand-in for the CUDA probe (gpu_share.FakeProbe)
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
