"""A trial process's stop request: SIGTERM/SIGINT set a flag that the trial's callbacks (and a
trial waiting for its turn on a shared GPU) read, so the trial saves a checkpoint and ends."""

from __future__ import annotations

import signal
from typing import Any

__all__ = ["install_stop_handlers", "request_stop", "stop_requested"]

_STOP = {"requested": False}


def request_stop(signum: int = 0, frame: Any = None) -> None:
    """Signal handler of the trial process: finish the current batch, save, and end."""
    _STOP["requested"] = True


def stop_requested() -> bool:
    return _STOP["requested"]


def install_stop_handlers() -> None:
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
