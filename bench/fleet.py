"""Many workers on one PostgreSQL study, with and without ``lightstudy proxy``.

For each mode, N ``lightstudy worker`` processes (tiny digits trials: one short epoch) finish one
study of T trials; the script samples ``pg_stat_activity`` every 0.2 s for the connections of the
study's database and reports the peak, the wall time, and whether every trial number appears
once, all COMPLETE, none lost or left RUNNING.

    python bench/fleet.py                      # 32 workers, 200 trials, both modes
    python bench/fleet.py --workers 8 --trials 40 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[1]
ADMIN = os.environ.get("LIGHTSTUDY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


def _spec(name: str, trials: int) -> dict[str, Any]:
    return {
        "study": {
            "name": name,
            "direction": "maximize",
            "metric": "val_acc",
            "n_trials": trials,
            "seed": 0,
            "sampler": {"name": "RandomSampler"},
            "pruner": None,
            "checkpoints": {"keep": 1},
            "heartbeat_interval": 5,
            "grace_period": 120,
        },
        "search_space": {"model.init_args.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "limit_train_batches": 1,
            "limit_val_batches": 1,
        },
        "model": {"class_path": "lightstudy.examples.ConvNet", "init_args": {"channels": 4, "hidden": 8}},
        "data": {"class_path": "lightstudy.examples.DigitsDataModule", "init_args": {"batch_size": 64}},
    }


def _connections(database: str) -> int:
    with psycopg.connect(f"{ADMIN}/postgres", autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()
        return int(row[0]) if row else 0


def run_mode(proxy: bool, workers: int, trials: int, work: Path) -> dict[str, Any]:
    import yaml

    database = f"bench_fleet_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = f"{ADMIN.replace('postgresql://', 'postgresql+psycopg://')}/{database}"
    spec = work / f"fleet-{database}.yaml"
    spec.write_text(yaml.safe_dump(_spec("fleet", trials)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lightstudy = [sys.executable, "-m", "lightstudy"]
    subprocess.run([*lightstudy, "create", str(spec), "--storage", url], check=True, env=env, capture_output=True)
    server = None
    storage = url
    if proxy:
        port = 13500 + os.getpid() % 400
        server = subprocess.Popen(
            [*lightstudy, "proxy", "--storage", url, "--port", str(port), "--threads", "32"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        storage = f"grpc://127.0.0.1:{port}"
        time.sleep(3)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _connections(database))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.time()
    procs = [
        subprocess.Popen(
            [*lightstudy, "worker", "--study", "fleet", "--run-dir", str(work / f"run-{database}"), "--threads", "1"],
            env={**env, "LIGHTSTUDY_STORAGE": storage},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(workers)
    ]
    outs = [p.communicate()[0] for p in procs]
    wall = time.time() - start
    done.set()
    sampler.join()
    if server is not None:
        server.terminate()
        server.wait(30)
    import optuna

    study = optuna.load_study(study_name="fleet", storage=url)
    states = [t.state.name for t in study.trials]
    numbers = [t.number for t in study.trials]
    failures = sum("Traceback" in o or "too many clients" in o for o in outs)
    with psycopg.connect(f"{ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return {
        "mode": "proxy" if proxy else "direct",
        "workers": workers,
        "trials": trials,
        "wall_s": round(wall, 1),
        "peak_connections": peak,
        "complete": states.count("COMPLETE"),
        "running_at_end": states.count("RUNNING"),
        "duplicate_numbers": len(numbers) - len(set(numbers)),
        "workers_exit_codes_nonzero": sum(p.returncode != 0 for p in procs),
        "workers_with_errors": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=32, help="worker processes per mode")
    parser.add_argument("--trials", type=int, default=200, help="trials of the study")
    parser.add_argument("--quick", action="store_true", help="4 workers, 12 trials")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fleet.jsonl")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.trials = 4, 12
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for proxy in (False, True):
            rows.append(run_mode(proxy, args.workers, args.trials, Path(tmp)))
    table = Table(
        "mode",
        "workers",
        "trials",
        "wall s",
        "peak DB connections",
        "complete",
        "running at end",
        "duplicates",
        "failed workers",
        title="fleet: one PostgreSQL study",
    )
    with open(args.out, "a") as out:
        for row in rows:
            out.write(json.dumps({"bench": "fleet", **row}) + "\n")
            table.add_row(
                row["mode"],
                str(row["workers"]),
                str(row["trials"]),
                str(row["wall_s"]),
                str(row["peak_connections"]),
                str(row["complete"]),
                str(row["running_at_end"]),
                str(row["duplicate_numbers"]),
                str(row["workers_exit_codes_nonzero"]),
            )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
