"""Ending a process as Python's own exit would, less the interpreter's teardown."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn

__all__ = ["exit_without_teardown"]


def exit_without_teardown(code: int) -> NoReturn:
    """End this process with ``code`` as an ordinary exit would up to the interpreter's teardown:
    its other (non-daemon) threads joined, its ``atexit`` handlers run, its output flushed; then
    ``os._exit``. With torch imported, the teardown (freeing every module's objects) takes
    1.3-1.7 s on 2 cores that nothing needs: the ``lightstudy`` script ends so
    (:func:`lightstudy.cli.shared.script`), and so does a worker forked by the launcher
    (:class:`lightstudy.launcher.ForkedWorker`), whose memory holds the launcher's objects."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what Python's exit runs first (no public name; typeshed lists it)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
