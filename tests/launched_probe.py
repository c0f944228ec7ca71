"""A stand-in for ``lightstudy.launched`` that tests/test_launcher.py forks with ForkedWorker.

It waits for its line on stdin as a launched worker does, then prints what a test checks:
the line, its environment variable ``PROBE``, whether it leads its own session; and exits with
the code given as its argument (``term`` waits for a signal instead).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

line = sys.stdin.readline().strip()
atexit.register(print, "probe atexit")  # its own handlers run; the forking process's do not
print(f"line={line!r} probe={os.environ.get('PROBE')} own_session={os.getsid(0) == os.getpid()}")
if sys.argv[1:] == ["term"]:
    print("waiting", flush=True)
    signal.pause()
sys.exit(int(sys.argv[1]) if line == "go" and len(sys.argv) > 1 else 0)
