"""Storage cost per trial at 100, 1k and 10k finished trials: raw Optuna vs lightstudy's path.

For each backend (SQLite, PostgreSQL), sampler (random, TPE), study size N and number of
concurrent clients C, two fresh studies are filled to N finished trials (10 intermediate values
each, and the dashboard note lightstudy's worker leaves on each, written straight into the
tables), then C client processes per study run trials with no
training, each reporting 10 synthetic epochs:

- optuna: ``study.ask`` + ``suggest_float`` + per epoch ``report``/``should_prune`` (Optuna's
  MedianPruner) + ``tell``;
- lightstudy: ``claim_trial`` (lock, reaping, budget, ask, heartbeat, params) with the spec's
  pruner as ``load_study`` builds it, the attrs the worker records at the start, per epoch what
  the worker answers the trial process (``_answer``), and ``Worker._finish`` (attrs, tell,
  checkpoint retention).

Both open the database with lightstudy's settings (SQLite in WAL mode with a busy timeout), so
what differs is the path. Each client runs one unmeasured trial first (a new process reads the
study once), then its share of the measured ones. Medians and p95 are per trial, in ms.

    python bench/storage.py                    # 100/1k/10k trials, 1 and 8 clients
    python bench/storage.py --quick            # 50/200 trials, 1 and 2 clients
    python bench/storage.py --backends postgresql --samplers random --sizes 10000 --clients 1 \
        --synchronous-commit on off            # issue 14's target row, both commit modes
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import tempfile
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from _common import parser, percentile, pg_database, table, write_jsonl

EPOCHS = 10  # reports (and pruning checks) per trial
PARAM = "model.init_args.lr"  # the one parameter of bench/_common.digits_spec
PHASES = ("claim", "params", "attrs", "reports", "tell", "retention")


def fill(url: str, study_name: str, n: int, seed: int) -> None:
    """Add ``n`` COMPLETE trials with EPOCHS intermediate values each, in one transaction."""
    import datetime

    import optuna
    import sqlalchemy
    from optuna.distributions import FloatDistribution, distribution_to_json
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    from lightstudy.storage import open_storage

    storage = open_storage(url)
    study_id = storage.get_study_id_from_name(study_name)
    dist = distribution_to_json(FloatDistribution(1e-3, 3e-2, log=True))
    finite_iv = models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE
    finite = models.TrialValueModel.TrialValueType.FINITE
    rng = random.Random(seed)
    now = datetime.datetime.now()
    with storage.engine.begin() as conn:
        first = conn.execute(sqlalchemy.text("SELECT coalesce(max(trial_id), 0) FROM trials")).scalar_one() + 1
        number = conn.execute(
            sqlalchemy.text("SELECT count(*) FROM trials WHERE study_id = :s"), {"s": study_id}
        ).scalar_one()
        trials, params, values, ivs = [], [], [], []
        for i in range(n):
            trial_id = first + i
            base = rng.random()
            curve = [base * (1 - 0.5 ** (e + 1)) + rng.gauss(0, 0.02) for e in range(EPOCHS)]
            trials.append(
                dict(
                    trial_id=trial_id,
                    number=number + i,
                    study_id=study_id,
                    state=TrialState.COMPLETE,
                    datetime_start=now,
                    datetime_complete=now,
                )
            )
            params.append(
                dict(trial_id=trial_id, param_name=PARAM, param_value=1e-3 + base * 0.02, distribution_json=dist)
            )
            values.append(dict(trial_id=trial_id, objective=0, value=curve[-1], value_type=finite))
            ivs += [
                dict(trial_id=trial_id, step=e, intermediate_value=v, intermediate_value_type=finite_iv)
                for e, v in enumerate(curve)
            ]
        conn.execute(models.TrialModel.__table__.insert(), trials)
        conn.execute(models.TrialParamModel.__table__.insert(), params)
        conn.execute(models.TrialValueModel.__table__.insert(), values)
        conn.execute(models.TrialIntermediateValueModel.__table__.insert(), ivs)
        notes = []  # the dashboard note lightstudy's worker writes for each trial (optuna-dashboard's keys)
        for i in range(n):
            body = f"**Complete** val_acc = {values[i]['value']:.4f}\n**Params:** lr = {params[i]['param_value']:.4g}\n"
            notes += [
                dict(study_id=study_id, key=f"dashboard:{first + i}:note_ver", value_json="1"),
                dict(study_id=study_id, key=f"dashboard:{first + i}:note_str:0", value_json=json.dumps(body)),
            ]
        conn.execute(models.StudySystemAttributeModel.__table__.insert(), notes)
        if storage.engine.dialect.name == "postgresql":  # the ids above were given, not drawn
            conn.execute(
                sqlalchemy.text("SELECT setval(pg_get_serial_sequence('trials', 'trial_id'), :m)"), {"m": first + n}
            )
    with storage.engine.begin() as conn:
        # Statistics, as autovacuum would gather them after a bulk load: the planner must not
        # plan a 10,000-trial table as an empty one.
        conn.execute(sqlalchemy.text("ANALYZE"))
    storage.engine.dispose()
    del optuna


class _Clock:
    """Accumulates wall time per phase of one trial."""

    def __init__(self) -> None:
        self.spent = dict.fromkeys(PHASES, 0.0)

    def phase(self, name: str) -> AbstractContextManager[None]:
        clock = self

        class _Timer:
            def __enter__(self) -> None:
                self.start = time.perf_counter()

            def __exit__(self, *exc: Any) -> None:
                clock.spent[name] += time.perf_counter() - self.start

        return _Timer()


def _curve(rng: random.Random) -> list[float]:
    base = rng.random()
    return [base * (1 - 0.5 ** (e + 1)) + rng.gauss(0, 0.02) for e in range(EPOCHS)]


def _optuna_client(url: str, name: str, sampler: str, seed: int, sync: str) -> Any:
    """One trial of raw Optuna per call."""
    import optuna

    from lightstudy.storage import open_storage
    from lightstudy.storage.boundary import wrap

    make = optuna.samplers.TPESampler if sampler == "tpe" else optuna.samplers.RandomSampler
    storage = open_storage(url, create=False)
    wrap(storage).set_session_options(sync)  # the same sessions as lightstudy's workers
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make(seed=seed),
        pruner=optuna.pruners.MedianPruner(),
    )
    rng = random.Random(seed)

    def one(clock: _Clock) -> None:
        with clock.phase("claim"):
            trial = study.ask()
        with clock.phase("params"):
            trial.suggest_float(PARAM, 1e-3, 3e-2, log=True)
        curve = _curve(rng)
        with clock.phase("reports"):
            for epoch, value in enumerate(curve):
                trial.report(value, epoch)
                trial.should_prune()
        with clock.phase("tell"):
            study.tell(trial, curve[-1])

    return one


def _lightstudy_client(url: str, name: str, sampler: str, seed: int, run_dir: str) -> Any:
    """One trial of lightstudy's worker path per call (the trial process replaced by its messages)."""
    import lightstudy.search_space
    import lightstudy.worker
    from lightstudy.checkpoints import TRIAL_DIR_ATTR, lineage_root
    from lightstudy.storage.boundary import trial_id
    from lightstudy.study import claim_trial
    from lightstudy.trial import Outcome, Report, ShouldPrune, TrialOutcome, trial_dir_name

    worker = lightstudy.worker.Worker(url, name, run_dir=run_dir)
    rng = random.Random(seed)
    clock_now: list[_Clock] = []

    def timed(phase: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with clock_now[0].phase(phase):
                return fn(*args, **kwargs)

        return wrapper

    # claim_trial imports suggest_params when called; the worker calls these by their names here.
    lightstudy.search_space.suggest_params = timed("params", lightstudy.search_space.suggest_params)
    lightstudy.worker.enforce_retention = timed("retention", lightstudy.worker.enforce_retention)
    lightstudy.worker.sweep_local = timed("retention", lightstudy.worker.sweep_local)

    def one(clock: _Clock) -> None:
        clock_now[:] = [clock]
        start = time.perf_counter()
        trial, _ = claim_trial(worker.study, worker.spec)
        assert trial is not None, "the budget is spent"
        clock.spent["claim"] += time.perf_counter() - start - clock.spent["params"]
        with clock.phase("attrs"):  # what Worker.run records before the trial process starts (one transaction)
            frozen = worker.db.trial(trial_id(trial))
            root = lineage_root(frozen)
            attrs = {"seed": root, "worker": "bench", "gpu": None, "threads": 1}
            worker._set_attrs(trial, {**attrs, TRIAL_DIR_ATTR: trial_dir_name(root)})
        answer = lightstudy.worker._answer(worker.db, trial)
        curve = _curve(rng)
        with clock.phase("reports"):
            for epoch, value in enumerate(curve):
                answer(Report(value, epoch))
                answer(ShouldPrune())
            answer.flush()
        outcome = TrialOutcome(Outcome.COMPLETE, values=[curve[-1]], timings={"fit": 0.0})
        start = time.perf_counter()
        retention = clock.spent["retention"]
        worker._finish(trial, outcome, None, trial_dir_name(root), 0.0)
        clock.spent["tell"] += time.perf_counter() - start - (clock.spent["retention"] - retention)

    return one


def _client(
    mode: str,
    url: str,
    name: str,
    sampler: str,
    sync: str,
    seed: int,
    trials: int,
    run_dir: str,
    barrier: Any,
    out: Any,
) -> None:
    logging.disable(logging.INFO)
    warnings.simplefilter("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    one = (
        _optuna_client(url, name, sampler, seed, sync)
        if mode == "optuna"
        else _lightstudy_client(url, name, sampler, seed, run_dir)
    )
    warm = _Clock()
    start = time.perf_counter()
    one(warm)  # a new process reads the study once
    first = time.perf_counter() - start
    barrier.wait()
    rows = []
    for _ in range(trials):
        clock = _Clock()
        start = time.perf_counter()
        one(clock)
        rows.append({"total": time.perf_counter() - start, **clock.spent})
    out.put((first, rows))


def run_config(
    mode: str, url: str, sampler: str, size: int, clients: int, measured: int, work: Path, sync: str = "on"
) -> dict[str, Any]:
    """Fill a fresh study to ``size`` trials, run ``clients`` processes, return the row."""
    import optuna

    from _common import digits_spec
    from lightstudy.spec import spec_from_dict
    from lightstudy.storage import open_storage
    from lightstudy.study import create_study

    name = f"{mode}-{sampler}-{size}-{clients}-{sync}"
    if mode == "optuna":
        storage = open_storage(url)
        optuna.create_study(storage=storage, study_name=name, direction="maximize")
        storage.engine.dispose()
    else:
        doc = digits_spec(
            name,
            n_trials=size + 100_000,
            epochs=EPOCHS,
            sampler={"name": "TPESampler" if sampler == "tpe" else "RandomSampler"},
            pruner={"name": "MedianPruner"},
        )
        if sync != "on":
            doc["study"]["storage_options"] = {"synchronous_commit": sync}
        storage = create_study(spec_from_dict(doc, source="bench"), url)._storage._backend
        storage.engine.dispose()
    fill(url, name, size, seed=size)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    share = max(1, round(measured / clients))
    procs = [
        ctx.Process(
            target=_client,
            args=(mode, url, name, sampler, sync, 1000 * i + 1, share, str(work / name), barrier, out),
        )
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    rows = [r for _, rs in results for r in rs]
    ms = [1000 * r["total"] for r in rows]
    row: dict[str, Any] = {
        "mode": mode,
        "sampler": sampler,
        "trials": size,
        "clients": clients,
        "measured": len(rows),
        "median_ms": round(percentile(ms, 50), 2),
        "p95_ms": round(percentile(ms, 95), 2),
        "first_trial_ms": round(1000 * max(f for f, _ in results), 1),
    }
    for phase in PHASES:
        row[f"{phase}_ms"] = round(percentile([1000 * r[phase] for r in rows], 50), 2)
    row["check_ms"] = round(row["reports_ms"] / EPOCHS, 3)  # one report + should_prune
    return row


def main() -> None:
    p = parser("storage", __doc__)
    p.add_argument("--sizes", type=int, nargs="+", help="finished trials before measuring (default 100 1000 10000)")
    p.add_argument("--clients", type=int, nargs="+", help="concurrent client processes (default 1 8)")
    p.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    p.add_argument("--samplers", nargs="+", default=["random", "tpe"], choices=["random", "tpe"])
    p.add_argument(
        "--synchronous-commit",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="the clients' study.storage_options synchronous_commit (SQLite: off is PRAGMA synchronous=NORMAL); "
        "raw Optuna's sessions the same",
    )
    args = p.parse_args()
    sizes, client_counts, measured = ((50, 200), (1, 2), 6) if args.quick else ((100, 1000, 10_000), (1, 8), 32)
    sizes, client_counts = args.sizes or sizes, args.clients or client_counts
    measured = args.reps or measured  # measured trials per configuration, shared by its clients
    # Imported once here, so that forked clients do not each import them.
    import optuna.samplers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")  # Optuna's experimental-feature notes

    import lightstudy.worker  # noqa: F401

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        work = Path(tmp)
        for backend in args.backends:
            for sampler in args.samplers:
                db: AbstractContextManager[str] = (
                    pg_database("bench_storage")
                    if backend == "postgresql"
                    else nullcontext(f"sqlite:///{work / f'{sampler}.db'}")
                )
                with db as url:
                    for sync in args.synchronous_commit:
                        for size in sizes:
                            for clients in client_counts:
                                for mode in ("optuna", "lightstudy"):
                                    row = run_config(mode, url, sampler, size, clients, measured, work, sync)
                                    rows.append({"backend": backend, "synchronous_commit": sync, **row})
                                    print(
                                        f"{backend} {sampler} {size} trials, {clients} clients, "
                                        f"synchronous_commit {sync}, {mode}: "
                                        f"median {row['median_ms']} ms, p95 {row['p95_ms']} ms",
                                        flush=True,
                                    )
    _print(rows)
    write_jsonl(args.out, "storage", rows, quick=args.quick, epochs=EPOCHS)


def _print(rows: list[dict[str, Any]]) -> None:
    pairs: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in rows:
        key = (r["backend"], r.get("synchronous_commit", "on"), r["sampler"], r["trials"], r["clients"])
        pairs.setdefault(key, {})[r["mode"]] = r
    table(
        "storage: ms per trial (claim + params + 10 x report/should_prune + tell), median / p95",
        [
            "backend",
            "synchronous_commit",
            "sampler",
            "trials",
            "clients",
            "optuna",
            "lightstudy",
            "ratio (median)",
            "ratio (p95)",
            "check ms (optuna → lightstudy)",
        ],
        [
            [
                *key,
                f"{p['optuna']['median_ms']} / {p['optuna']['p95_ms']}",
                f"{p['lightstudy']['median_ms']} / {p['lightstudy']['p95_ms']}",
                f"{p['lightstudy']['median_ms'] / p['optuna']['median_ms']:.2f}",
                f"{p['lightstudy']['p95_ms'] / p['optuna']['p95_ms']:.2f}",
                f"{p['optuna']['check_ms']} → {p['lightstudy']['check_ms']}",
            ]
            for key, p in pairs.items()
        ],
    )
    table(
        "storage: where a trial's time goes (median ms per phase)",
        ["backend", "sync commit", "sampler", "trials", "clients", "mode", *PHASES, "first trial"],
        [
            [
                r["backend"],
                r.get("synchronous_commit", "on"),
                r["sampler"],
                r["trials"],
                r["clients"],
                r["mode"],
                *(r[f"{p}_ms"] for p in PHASES),
                r["first_trial_ms"],
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
