"""What every benchmark script shares: arguments, statistics, the table and the JSON lines.

Each script in ``bench/`` prints one rich table per comparison and appends one JSON object per row
to ``bench/results/<name>.jsonl`` (or ``--out``). Numbers are medians over repetitions with their
min-max, and comparisons are run side by side in one invocation, so ratios are what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# The admin URL of the PostgreSQL server benchmarks create their throw-away databases on.
PG_ADMIN = os.environ.get("LIGHTSTUDY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: ``--quick``, ``--reps``, ``--out``."""
    p = argparse.ArgumentParser(
        prog=f"bench/{name}.py",
        description=(doc or name).strip().splitlines()[0],
        epilog=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a small run (under a minute here) that checks the script")
    p.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default: per script)")
    p.add_argument("--out", type=Path, default=RESULTS / f"{name}.jsonl", help="JSON lines appended here")
    return p


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of ``values`` (empty -> NaNs)."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, nearest-rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def spread(s: dict[str, float], fmt: str = "{:.3g}") -> str:
    """``median (min-max)`` for a table cell."""
    if not s.get("n"):
        return "-"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"


def machine() -> dict[str, Any]:
    """Where a result was measured (goes into every JSON line)."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "host": platform.node(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print one table of results."""
    from rich.console import Console
    from rich.table import Table

    t = Table(*columns, title=title)
    for row in rows:
        t.add_row(*[str(c) for c in row])
    Console(width=200, file=sys.stdout).print(t)


def write_jsonl(path: Path, bench: str, rows: Sequence[dict[str, Any]], **common: Any) -> None:
    """Append ``rows`` as JSON lines tagged with the benchmark, the run's settings and the machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    where = machine()
    with open(path, "a") as out:
        for row in rows:
            out.write(json.dumps({"bench": bench, **common, **row, "machine": where}, default=str) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


@contextlib.contextmanager
def pg_database(prefix: str = "bench") -> Iterator[str]:
    """A throw-away PostgreSQL database; yields its SQLAlchemy URL and drops it afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    finally:
        with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL server of the benchmark's own: ``initdb`` into a temporary folder, on a free
    port, so a script may stop and restart it without touching the shared server (as the
    database-restart test in tests/test_worker.py does). ``close`` stops it and deletes it all.

    ``url`` is the SQLAlchemy URL of its ``postgres`` database; ``database(name)`` makes another.
    """

    def __init__(self) -> None:
        import glob
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
        if not found[-1]:
            raise RuntimeError("initdb not found: install the PostgreSQL server (Debian: postgresql)")
        self.bin = Path(found[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="lightstudy-bench-pg-"))  # postgres must reach it
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False
        if os.geteuid() == 0:  # the server refuses to run as root: it runs as the postgres user
            shutil.chown(self.root, "postgres")
        try:
            self._ctl("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
            self.start()
        except BaseException:
            self.close()
            raise

    def _ctl(self, program: str, *args: str) -> None:
        cmd = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, timeout=120, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args[:2])} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._ctl("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")
        self.running = True

    def stop(self) -> None:
        """Fast shutdown: sessions are cut, as when a database server restarts."""
        self._ctl("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.running = False

    def database(self, name: str) -> str:
        """Create database ``name``; its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def digits_spec(
    name: str,
    *,
    n_trials: int,
    epochs: int,
    seed: int = 0,
    sampler: dict[str, Any] | None = None,
    pruner: dict[str, Any] | None = None,
    search_space: dict[str, Any] | None = None,
    tiny: bool = False,
    keep: int = 1,
) -> dict[str, Any]:
    """A digits study document (as a YAML file would hold it) for benchmarks.

    ``tiny`` makes a trivial trial: one training and one validation batch of a 4-channel net,
    so what is measured is the service around the training, not the training.
    """
    trainer: dict[str, Any] = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "deterministic": True,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    model: dict[str, Any] = {"class_path": "lightstudy.examples.ConvNet", "init_args": {}}
    if tiny:
        trainer.update(limit_train_batches=1, limit_val_batches=1)
        model["init_args"] = {"channels": 4, "hidden": 8}
    return {
        "study": {
            "name": name,
            "direction": "maximize",
            "metric": "val_acc",
            "n_trials": n_trials,
            "seed": seed,
            "sampler": sampler or {"name": "RandomSampler"},
            "pruner": pruner,
            "checkpoints": {"keep": keep},
        },
        "search_space": search_space
        or {"model.init_args.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        "trainer": trainer,
        "model": model,
        "data": {"class_path": "lightstudy.examples.DigitsDataModule", "init_args": {"batch_size": 64}},
    }
