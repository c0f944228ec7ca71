"""Worker scaling: trials per hour with 1, 2 and 4 local workers, on SQLite and PostgreSQL.

Each run trains a fresh study of the same digits trials (fixed epochs, no pruner, RandomSampler
with a fixed seed, one torch thread per trial, as every benchmark here), started one of two ways
(``--via``):

  run      ``lightstudy run SPEC --workers N --threads 1``: what a user on one machine runs (one
           warm process forks every worker's trials; the study is created by the command, timed)
  worker   N ``lightstudy worker --threads 1`` processes on a study created beforehand: what
           N hosts run (each worker starts its own warm process)

timed from the launch to the last process's exit. T(N) is that wall time; efficiency at N workers is
T(1) / (N' * T(N)) with N' = min(N, cores), so 1.0 means the cores are used as well as one worker
uses one core. Start-up (launch to the first trial's end, less the fastest trial: worker processes and
forkserver warm-up) is reported separately, and so is the steady part (first trial start to last
trial end), and the storage share (the workers' storage time, from the trials' recorded
claim/prepare timings and the gaps between one trial's tell and the next one's start, over workers x
steady time). Every run is checked: all trials COMPLETE, none RUNNING, no duplicate numbers, no
storage errors in the worker logs.

    python bench/scaling.py                   # 40 trials of 3 epochs, once, both ways (about 14 minutes)
    python bench/scaling.py --via run --workers 1,2   # lightstudy run only, 1 and 2 workers
    python bench/scaling.py --quick           # 4 tiny trials, 1 and 2 workers
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, digits_spec, parser, pg_database, spread, stats, table, write_jsonl

TARGET_EFFICIENCY = 0.9  # T(1) / (2 T(2)) on 2 cores
# What a worker log says when the storage misbehaved (retried or not).
STORAGE_ERRORS = ("database is locked", "database unavailable", "OperationalError", "Traceback", "failed as stale")


@contextlib.contextmanager
def storage(backend: str, work: Path, tag: str) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{work / tag / 'study.db'}"
    else:
        with pg_database("bench_scaling") as url:
            yield url


def run_once(backend: str, via: str, workers: int, doc: dict[str, Any], work: Path, tag: str) -> dict[str, Any]:
    import optuna
    import yaml

    name = doc["study"]["name"]
    doc = {**doc, "study": {**doc["study"], "run_dir": str(work / tag)}}
    spec = work / f"{tag}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LIGHTSTUDY_STORAGE", None)
    cli = [sys.executable, "-m", "lightstudy"]
    with storage(backend, work, tag) as url:
        if via == "run":
            commands = [[*cli, "run", str(spec), "--storage", url, "--workers", str(workers), "--threads", "1"]]
        else:
            subprocess.run([*cli, "create", str(spec), "--storage", url], env=env, check=True, capture_output=True)
            worker = [*cli, "worker", "--study", name, "--storage", url, "--run-dir", str(work / tag), "--threads", "1"]
            commands = [worker] * workers
        launched = time.time()
        procs = [
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for command in commands
        ]
        outs = [p.communicate()[0] for p in procs]
        wall = time.time() - launched
        trials = optuna.load_study(study_name=name, storage=url).trials
    # lightstudy run's workers log to the run folder; its own output is the progress
    outs += [log.read_text() for log in sorted((work / tag / "workers").glob("worker-*.log"))]
    logs = "".join(outs)
    states = [t.state.name for t in trials]
    numbers = [t.number for t in trials]
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]
    errors = sum(logs.count(e) for e in STORAGE_ERRORS)
    durations = sorted(t.duration.total_seconds() for t in trials if t.duration)
    # the fastest, not the median: the first trial to end took at least that long, so start-up is
    # never negative (with 2 trials the median was the slower one, and start-up came out < 0)
    fastest = durations[0] if durations else 0.0
    steady = max(ends) - min(starts) if starts and ends else float("nan")
    return {
        # the workers' storage time, as a share of their steady time: what 2 workers can lose to it
        "storage_share": storage_seconds(trials) / (workers * steady) if steady > 0 else float("nan"),
        "wall_s": wall,
        # the first trial's end beyond the fastest trial: worker start and forkserver warm-up
        "startup_s": min(ends) - launched - fastest if ends else float("nan"),
        "steady_s": steady,
        "complete": states.count("COMPLETE"),
        "running_at_end": states.count("RUNNING"),
        "lost": doc["study"]["n_trials"] - len(trials),
        "failed": states.count("FAIL"),
        "duplicate_numbers": len(numbers) - len(set(numbers)),
        "storage_errors": errors,
        "exit_nonzero": sum(p.returncode != 0 for p in procs),
        "stderr": logs[-1500:] if any(p.returncode for p in procs) else "",
    }


def storage_seconds(trials: list[Any]) -> float:
    """Seconds the workers spent on the storage, from what each trial recorded: its claim and
    prepare (timings attr: the database work after Optuna's ask) plus, per worker, the gaps
    between one trial's tell and its next trial's start (the tell's tail, note, retention,
    sweep, the next claim's lock, reaping, budget count and ask). The rest of a trial is its
    process and its training (CPU, which 2 workers on 2 cores contend for)."""
    inside = sum(
        float(t.user_attrs.get("timings", {}).get(k, 0.0)) for t in trials for k in ("claim", "prepare", "checkpoint")
    )
    by_worker: dict[str, list[Any]] = {}
    for t in trials:
        if t.datetime_start and t.datetime_complete:
            by_worker.setdefault(str(t.user_attrs.get("worker")), []).append(t)
    gaps = 0.0
    for mine in by_worker.values():
        mine.sort(key=lambda t: t.datetime_start)
        gaps += sum(
            max(0.0, (b.datetime_start - a.datetime_complete).total_seconds()) for a, b in itertools.pairwise(mine)
        )
    return inside + gaps


def main() -> None:
    p = parser("scaling", __doc__)
    p.add_argument("--trials", type=int, default=None, help="trials per run (default 40; --quick 4)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 3; --quick: a tiny trial)")
    p.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    p.add_argument("--via", default="run,worker", help="comma-separated: run (lightstudy run), worker (N workers)")
    p.add_argument(
        "--workers", default=None, help="comma-separated worker counts, 1 first (default 1,2,4; --quick 1,2)"
    )
    args = p.parse_args()
    trials = args.trials or (4 if args.quick else 40)
    epochs = args.epochs or (1 if args.quick else 3)
    reps = args.reps or 1  # 40 trials run long enough that start-up is a small part
    counts = [int(n) for n in args.workers.split(",")] if args.workers else [1, 2] if args.quick else [1, 2, 4]
    if counts[0] != 1:
        p.error("--workers must start with 1 (efficiency is against one worker)")
    vias = args.via.split(",")
    if not set(vias) <= {"run", "worker"}:
        p.error(f"--via takes run and/or worker, not {args.via!r}")
    cores = os.cpu_count() or 1
    doc = digits_spec("scaling", n_trials=trials, epochs=epochs, tiny=args.quick)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for backend, via in itertools.product(args.backends.split(","), vias):
            runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
            for rep in range(reps):
                for n in counts:  # interleaved, so load from elsewhere hits every count alike
                    got = run_once(backend, via, n, doc, Path(tmp), f"{backend}-{via}-{n}-{rep}")
                    if got["exit_nonzero"]:
                        print(got["stderr"], file=sys.stderr)
                    runs[n].append(got)
            t1 = stats([r["wall_s"] for r in runs[1]])["median"]
            s1 = stats([r["steady_s"] for r in runs[1]])["median"]
            for n in counts:
                rs = runs[n]
                wall, steady = stats([r["wall_s"] for r in rs]), stats([r["steady_s"] for r in rs])
                used = min(n, cores)
                rows.append(
                    {
                        "backend": backend,
                        "via": via,
                        "workers": n,
                        "trials": trials,
                        "epochs": epochs,
                        "wall_s": wall,
                        "startup_s": stats([r["startup_s"] for r in rs]),
                        "steady_s": steady,
                        "trials_per_hour": trials * 3600 / wall["median"],
                        "efficiency": t1 / (used * wall["median"]),
                        "steady_efficiency": s1 / (used * steady["median"]),
                        "storage_share": stats([r["storage_share"] for r in rs])["median"],
                        **{k: sum(r[k] for r in rs) for k in _CHECKS},
                        "errors": sum(r[k] for r in rs for k in _CHECKS if k != "complete")
                        + sum(r["complete"] != trials for r in rs),
                    }
                )
    table(
        f"scaling: {trials} trials of {'a tiny trial' if args.quick else f'{epochs} epochs'}, {cores} cores; "
        "s: median (min-max)",
        [
            "backend",
            "via",
            "workers",
            "wall s",
            "start-up s",
            "steady s",
            "trials/h",
            "efficiency",
            "steady eff.",
            "storage share",
            "errors",
        ],
        [
            [
                r["backend"],
                r["via"],
                r["workers"],
                spread(r["wall_s"]),
                spread(r["startup_s"]),
                spread(r["steady_s"]),
                f"{r['trials_per_hour']:.0f}",
                f"{r['efficiency']:.2f}",
                f"{r['steady_efficiency']:.2f}",
                f"{r['storage_share']:.1%}",
                r["errors"],
            ]
            for r in rows
        ],
    )
    checks = [
        {
            "backend": r["backend"],
            "via": r["via"],
            "target": f"efficiency T(1)/(2 T(2)) >= {TARGET_EFFICIENCY}",
            "measured": round(r["efficiency"], 3),
            "met": r["efficiency"] >= TARGET_EFFICIENCY and r["errors"] == 0,
            "errors": 0,
        }
        for r in rows
        if r["workers"] == 2
    ]
    table(
        "targets",
        ["backend", "via", "target", "measured", "met"],
        [[c[k] for k in ("backend", "via", "target", "measured", "met")] for c in checks],
    )
    write_jsonl(args.out, "scaling", [*rows, *checks], quick=args.quick, reps=reps)


# Counted over a row's runs: what must be zero (and complete, which must be trials per run).
_CHECKS = ("complete", "running_at_end", "lost", "failed", "duplicate_numbers", "storage_errors", "exit_nonzero")


if __name__ == "__main__":
    os.chdir(REPO)
    main()
