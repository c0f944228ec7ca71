"""A worker the launcher started: ``python -m lightstudy.launched ARGS``, or the same module run
in a process forked from the launcher (:class:`lightstudy.launcher.ForkedWorker`).

It imports what a worker needs while the launcher's warm process imports torch (forked: the
launcher has loaded Optuna, SQLAlchemy and the storage's schema; the rest is ~30 ms), then
waits for the launcher's word on stdin before it runs ``lightstudy worker ARGS``.
"""

from __future__ import annotations

import sys

__all__ = ["worker_main"]


def worker_main(argv: list[str]) -> int:
    """A worker of the launcher's (``python -m lightstudy.launched ARGS``): the imports of a worker
    first, then a line on stdin: ``go`` runs ``lightstudy worker ARGS``; its end (the launcher
    cancelled, or is gone) exits 0 at once."""
    import lightstudy.worker  # noqa: F401 (Optuna, SQLAlchemy: the bulk of a worker's start)
    from lightstudy.cli import main

    if sys.stdin.readline().strip() != "go":
        return 0
    return int(main(["worker", *argv]) or 0)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
