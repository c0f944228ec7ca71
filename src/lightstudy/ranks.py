"""A trial's processes: one per device, forked by the warm process, watched together.

A multi-device (DDP) trial runs one process per device, each told its rank through the
environment Lightning reads (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``), as
torchrun would. The worker polls every rank: rank 0's outcome is the trial's, and when any rank
fails or dies the others are killed at once, so none hangs in a collective or outlives the trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from lightstudy.trial import Finished, Message, Outcome, ShouldPrune, TrialJob, TrialOutcome, trial_main

__all__ = ["STOPPED_BEFORE_START", "exit_reason", "run_processes"]

STOPPED_BEFORE_START = "stopped by signal before the trial process started"


class Rank:
    """One process of a trial, and what it reported."""

    def __init__(self, rank: int, process: Any, conn: Any, handle: Callable[[Message], Any]) -> None:
        self.rank = rank
        self.process = process
        self.receiver = conn
        self.handle = handle
        self.outcome: TrialOutcome | None = None
        self.done = False

    def poll(self) -> None:
        """Answer what the process asked (reports, pruning questions, attrs); keep its outcome."""
        if self.done:
            return
        try:
            while self.receiver.poll(0):
                message = self.receiver.recv()
                if isinstance(message, Finished):
                    self.outcome = message.outcome
                    self.done = True
                    return
                reply = self.handle(message)
                if isinstance(message, ShouldPrune):
                    self.receiver.send(reply)
        except (EOFError, OSError):
            self.done = True

    @property
    def died(self) -> bool:
        """Gone without an outcome, by a signal or a crash."""
        self.poll()
        return self.outcome is None and not self.process.is_alive() and self.process.exitcode not in (0, None)

    @property
    def broken(self) -> bool:
        """Failed, or gone without a word."""
        if self.outcome is not None:
            return self.outcome.state == Outcome.FAILED
        if not self.process.is_alive():
            self.poll()
            return self.outcome is None or self.outcome.state == Outcome.FAILED
        return False

    def why(self, world: int) -> str:
        prefix = f"rank {self.rank}: " if world > 1 else ""
        if self.outcome is not None and self.outcome.reason:
            return prefix + self.outcome.reason
        self.process.join(timeout=5)
        return prefix + exit_reason(self.process.exitcode)


def run_processes(
    ctx: Any,
    job: TrialJob,
    world: int,
    threads: int | None,
    limit: float | None,
    running: list[Any],
    handle: Callable[[Message], Any],
    stopping: Callable[[], bool] = lambda: False,
    exiting: list[Rank] | None = None,
) -> tuple[TrialOutcome | None, str | None]:
    """Run a trial's ``world`` processes (from ``ctx``: a :class:`~lightstudy.warmserver.WarmContext`,
    or a multiprocessing context) to the end.

    ``handle`` answers what a process asks the worker (see :class:`lightstudy.trial.WorkerTrial`).
    Returns (rank 0's outcome, None), a TIMED_OUT one past ``limit``, or (None, why the trial
    died). ``running`` holds the processes while they run, for the worker's signal handler;
    ``stopping`` says that a stop was asked (a signal that came before a process was there to
    pass it to).

    ``exiting`` (a list the caller keeps): a single process that sent its outcome is left there
    to exit while the caller records the outcome (a forked torch process takes about 20 ms to
    be torn down by the kernel and reported), and is waited for by the next call before its
    process starts (GPU memory is free before the next trial takes it), or by
    :func:`finish_exits`.
    """
    from multiprocessing.connection import wait

    if exiting:
        finish_exits(exiting)
    if stopping():
        return None, STOPPED_BEFORE_START
    port = free_port() if world > 1 else None
    ranks = []
    running.clear()
    for rank in range(world):
        ours, theirs = ctx.Pipe(duplex=True)
        rank_job = dataclasses.replace(job, rank=rank, world_size=world, master_port=port, threads=threads)
        child = ctx.Process(target=trial_main, args=(rank_job, theirs), name=f"trial-{job.number}-{rank}")
        child.start()
        running.append(child)  # at once: from here a signal reaches it
        theirs.close()
        ranks.append(Rank(rank, child, ours, handle))
    if stopping():  # asked while the processes started: pass it on (a second SIGTERM is harmless)
        for r in ranks:
            with contextlib.suppress(OSError):
                os.kill(r.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + limit if limit else None
    reason: str | None = None
    handed = False  # the ranks went to ``exiting``: not killed or closed here
    try:
        while True:
            for r in ranks:
                r.poll()
            if ranks[0].outcome is not None:
                break
            broken = next((r for r in ranks if r.broken), None)
            if broken is not None:
                reason = broken.why(world)
                if broken.outcome is not None:  # a rank's own failure, with its reason
                    ranks[0].outcome = dataclasses.replace(broken.outcome, reason=reason)
                break
            if deadline is not None and time.monotonic() > deadline:
                reason = f"exceeded study.trial_timeout ({limit:g} s); the trial process was killed"
                ranks[0].outcome = TrialOutcome(Outcome.TIMED_OUT, reason=reason)
                break
            # Wake at once for a message (a pruning question waits on the answer) or an exit.
            waiting = [r.receiver for r in ranks if not r.done] + [r.process.sentinel for r in ranks]
            wait(waiting, timeout=0.5)
        outcome = ranks[0].outcome
        if outcome is not None and outcome.state not in (Outcome.FAILED, Outcome.TIMED_OUT):
            if exiting is not None and world == 1:
                handed = True  # it exits while its outcome is recorded
                exiting.extend(ranks)
            else:  # every rank ends the same way; wait for the others to finish cleanly
                join_all(ranks, timeout=60)
        elif world > 1:
            # Rank 0 failing often only echoes another rank's death (its collective broke):
            # a killed rank makes the trial a retry, not a failure of its parameters.
            join_all(ranks[1:], timeout=5)
            dead = next((r for r in ranks if r.died), None)
            if dead is not None:
                outcome, reason = None, dead.why(world)
        if outcome is not None:
            reason = None
    finally:
        if not handed:
            kill_all(ranks)
        running.clear()
    if outcome is None and reason is None:
        reason = ranks[0].why(world)
    if not handed:
        _close(ranks)
    return outcome, reason


def finish_exits(exiting: list[Rank], timeout: float = 60) -> None:
    """Wait for the processes :func:`run_processes` left to exit (killed past ``timeout``)."""
    join_all(exiting, timeout=timeout)
    kill_all(exiting)
    _close(exiting)
    exiting.clear()


def _close(ranks: list[Rank]) -> None:
    for r in ranks:
        with contextlib.suppress(ValueError):  # a process that would not exit keeps its handle
            r.process.close()


def join_all(ranks: list[Rank], timeout: float) -> None:
    end = time.monotonic() + timeout
    for r in ranks:
        r.process.join(timeout=max(0.0, end - time.monotonic()))


def kill_all(ranks: list[Rank]) -> None:
    for r in ranks:
        if r.process.is_alive():
            r.process.kill()
    for r in ranks:
        r.process.join(timeout=30)
        r.receiver.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "the trial process did not exit"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"the trial process was killed by {name}{hint}"
    return f"the trial process exited with code {exitcode} without reporting a result"
