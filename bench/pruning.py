"""Pruning time-to-target on the digits study: how many epochs until the best val_acc reaches a target.

For each seed and each pruner (none, Median, SuccessiveHalving, Hyperband) the script runs the
digits study (the search space, model and data of ``studies/digits.yaml``) through lightstudy
itself, ``lightstudy run SPEC --workers 2`` on a temporary SQLite storage and run dir, and reads
the trials back: epochs trained per trial are the steps it reported (its intermediate values),
summed over all finished trials in completion order until the first COMPLETE trial whose val_acc
reaches each of ``--targets``; the wall time to target counts from the first trial's start (the launch
and forkserver start-up are the same for every pruner). After the whole budget of ``--trials``
trials it reports the best val_acc of the COMPLETE trials, as ``lightstudy best`` would, and the
epochs each pruner took to reach the final best of no pruning (the same result for less).

A trial's parameters come from the sampler seeded with ``seed + trial number`` and it trains
with that seed (``deterministic: true``), so with the random sampler trial k is the same
configuration under every pruner: a pruned trial's curve is a prefix of the unpruned one. With
TPE this holds for the startup trials only. Seeds ``s`` and ``s + 1`` would share all but one
trial, so repetitions use seeds ``--seed-step`` apart.

Epoch counts barely depend on the machine's load; wall times do (other processes on the cores).
Ctrl-C prints the table of the seeds finished so far.

    python bench/pruning.py                         # 5 seeds x 4 pruners x 16 trials, the study's sampler
    python bench/pruning.py --reps 3                # 3 seeds (5 took 40 min on 2 cores shared with other runs)
    python bench/pruning.py --samplers tpe random   # also with the random sampler
    python bench/pruning.py --quick                 # 1 seed, 4 trials of 2 epochs, none vs median; checks all specs
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, digits_spec, parser, spread, stats, table, write_jsonl

STUDY = REPO / "studies" / "digits.yaml"
TARGETS = (0.97, 0.99)  # val_acc; about half of all trials end >= 0.97 after 12 epochs, 1 in 10 >= 0.99
TRIALS = 16  # trials per study: the fixed budget the final best is read after (on 2 cores, 30 took too long)
EPOCHS = 12  # trainer.max_epochs, as studies/digits.yaml
SEEDS = 5  # repetitions, seeds SEED_STEP apart
SEED_STEP = 1000  # seeds s and s+1 share all but one trial (trial k of seed s is trial k-1 of seed s+1)
WORKERS = 2  # `lightstudy run --workers`

# The pruners compared, with kwargs chosen by replaying 60 recorded 12-epoch curves of this study
# (random sampler, 2 workers) under each candidate. A step is an epoch, counted from 0.
PRUNERS: dict[str, dict[str, Any] | None] = {
    "none": None,
    # Below the median of 3+ finished trials from step 1 on: half the epochs of no pruning, the
    # final best within one validation image (n_startup_trials 5, n_warmup_steps 3 saved a quarter).
    "median": {"name": "MedianPruner", "n_startup_trials": 3, "n_warmup_steps": 1},
    # Rungs at steps 2, 4, 8 keeping the top half; min_resource 1 or reduction_factor 3 lost the 0.99 trial more often.
    "sha": {"name": "SuccessiveHalvingPruner", "min_resource": 2, "reduction_factor": 2},
    # Brackets of SHA from 1 epoch to max_epochs (max_resource follows --epochs).
    "hyperband": {"name": "HyperbandPruner", "min_resource": 1, "max_resource": EPOCHS, "reduction_factor": 3},
}
SAMPLERS: dict[str, dict[str, Any] | None] = {
    "study": None,  # studies/digits.yaml's own sampler
    "tpe": {"name": "TPESampler", "multivariate": True, "n_startup_trials": 10},
    "random": {"name": "RandomSampler"},
}


def study_doc(name: str, *, seed: int, trials: int, epochs: int, sampler: str, pruner: str) -> dict[str, Any]:
    """The digits study of ``studies/digits.yaml`` with this run's seed, budget, sampler and pruner."""
    digits = yaml.safe_load(STUDY.read_text())
    pruner_kwargs = PRUNERS[pruner]
    if pruner_kwargs and "max_resource" in pruner_kwargs:
        pruner_kwargs = {**pruner_kwargs, "max_resource": epochs}
    doc = digits_spec(
        name,
        n_trials=trials,
        epochs=epochs,
        seed=seed,
        sampler=SAMPLERS[sampler] or digits["study"]["sampler"],
        pruner=pruner_kwargs,
        search_space=digits["search_space"],
        keep=digits["study"]["checkpoints"]["keep"],
    )
    doc["model"], doc["data"] = digits["model"], digits["data"]
    return doc


def check_specs(samplers: list[str], *, trials: int, epochs: int) -> list[str]:
    """Every sampler x pruner spec through lightstudy's own checks (``--quick`` runs only two pruners)."""
    from lightstudy.components import check_components
    from lightstudy.spec import spec_from_dict

    checked = []
    for sampler in samplers:
        for pruner in PRUNERS:
            doc = study_doc("check", seed=0, trials=trials, epochs=epochs, sampler=sampler, pruner=pruner)
            check_components(spec_from_dict(doc, source=f"bench/pruning.py {sampler} {pruner}"))
            checked.append(f"{sampler}/{pruner}")
    return checked


def run_study(work: Path, *, seed: int, trials: int, epochs: int, sampler: str, pruner: str) -> dict[str, Any]:
    """One ``lightstudy run`` of the study; returns its trials as (number, state, value, epochs, times)."""
    import optuna

    name = f"digits-{sampler}-{pruner}-{seed}"
    spec = work / f"{name}.yaml"
    spec.write_text(
        yaml.safe_dump(study_doc(name, seed=seed, trials=trials, epochs=epochs, sampler=sampler, pruner=pruner))
    )
    url = f"sqlite:///{work / name}.db"
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightstudy",
            "run",
            str(spec),
            "--workers",
            str(WORKERS),
            "--storage",
            url,
            "--run-dir",
            str(work / name),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    launch_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"lightstudy run {name} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    finished = [t for t in optuna.load_study(study_name=name, storage=url).get_trials() if t.state.is_finished()]
    finished.sort(key=lambda t: (t.datetime_complete or datetime.datetime.max, t.number))
    return {"trials": finished, "launch_s": launch_s}


def reach(run: dict[str, Any], target: float) -> dict[str, Any] | None:
    """Epochs, seconds and trials until a COMPLETE trial's value is >= ``target`` (None: never)."""
    epochs = 0
    for i, (e, value, end) in enumerate(zip(run["epochs_per_trial"], run["values"], run["ends_s"]), 1):
        epochs += e
        if value is not None and value >= target:
            return {"epochs": epochs, "seconds": end, "trials": i}
    return None


def measure(trials: list[Any], targets: list[float]) -> dict[str, Any]:
    """The finished trials in completion order (epochs, value, end), per target the cost of reaching it, totals."""
    if not trials:
        raise RuntimeError("the study finished no trial")
    t0 = min(t.datetime_start for t in trials)
    complete = [t.value for t in trials if t.state.name == "COMPLETE"]
    run: dict[str, Any] = {
        "epochs_per_trial": [len(t.intermediate_values) for t in trials],  # one report per validation epoch
        "values": [t.value if t.state.name == "COMPLETE" else None for t in trials],  # pruned: no result
        "ends_s": [round((t.datetime_complete - t0).total_seconds(), 1) for t in trials],  # from the first start
    }
    return {
        "to_target": {str(g): reach(run, g) for g in targets},
        "final_best": max(complete) if complete else None,
        "epochs_total": sum(run["epochs_per_trial"]),
        "seconds_total": max(run["ends_s"]),
        "complete": len(complete),
        "pruned": sum(t.state.name == "PRUNED" for t in trials),
        **run,
    }


def _ratios(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] / b[key] for r, b in zip(runs, base) if r[key] is not None and b[key]]


def summarize(
    sampler: str,
    pruner: str,
    seeds: list[int],
    runs: list[dict[str, Any]],
    base: list[dict[str, Any]],
    targets: list[float],
) -> dict[str, Any]:
    """One JSON row: per target the epochs/seconds to it and their ratio to no pruning, the final best, totals."""
    row: dict[str, Any] = {
        "sampler": sampler,
        "sampler_kwargs": SAMPLERS[sampler] or yaml.safe_load(STUDY.read_text())["study"]["sampler"],
        "pruner": pruner,
        "pruner_kwargs": PRUNERS[pruner],
    }
    for g in targets:
        hits = [r["to_target"][str(g)] for r in runs]
        hits_base = [r["to_target"][str(g)] for r in base]
        row[f"to_{g}"] = {
            "reached": sum(h is not None for h in hits),
            "epochs": stats([h["epochs"] for h in hits if h]),
            "seconds": stats([h["seconds"] for h in hits if h]),
            "epochs_ratio_vs_none": stats([h["epochs"] / b["epochs"] for h, b in zip(hits, hits_base) if h and b]),
        }
    # What pruning is for: the same result for less. Per seed, the cost of reaching the final best
    # that no pruning reached after the whole budget, against no pruning's own cost of it.
    hits = [reach(r, b["final_best"]) for r, b in zip(runs, base)]
    hits_base = [reach(b, b["final_best"]) for b in base]
    row["to_none_best"] = {
        "reached": sum(h is not None for h in hits),
        "epochs": stats([h["epochs"] for h in hits if h]),
        "seconds": stats([h["seconds"] for h in hits if h]),
        "epochs_ratio_vs_none": stats([h["epochs"] / b["epochs"] for h, b in zip(hits, hits_base) if h and b]),
    }
    row["final_best"] = stats([r["final_best"] for r in runs if r["final_best"] is not None])
    row["final_best_delta_points"] = stats(
        [100 * (r["final_best"] - b["final_best"]) for r, b in zip(runs, base) if r["final_best"] and b["final_best"]]
    )
    row["epochs_total"] = stats([r["epochs_total"] for r in runs])
    row["epochs_total_ratio_vs_none"] = stats(_ratios(runs, base, "epochs_total"))
    row["seconds_total"] = stats([r["seconds_total"] for r in runs])
    row["pruned"] = stats([r["pruned"] for r in runs])
    row["per_seed"] = [{"seed": s, **r} for s, r in zip(seeds, runs)]
    return row


def report(
    results: dict[tuple[str, str, int], dict[str, Any]],
    samplers: list[str],
    pruners: list[str],
    seeds: list[int],
    targets: list[float],
    budget: str,
) -> list[dict[str, Any]]:
    """Print the table (one row per sampler and pruner) and return its JSON rows."""
    rows, cells = [], []
    for sampler in samplers:
        base = [results[sampler, "none", s] for s in seeds]
        for pruner in pruners:
            runs = [results[sampler, pruner, s] for s in seeds]
            row = summarize(sampler, pruner, seeds, runs, base, targets)
            rows.append(row)
            cell = [sampler, pruner]
            for key in [*(f"to_{g}" for g in targets), "to_none_best"]:
                t = row[key]
                missed = f" reached {t['reached']}/{len(seeds)}" if t["reached"] < len(seeds) else ""
                cell += [spread(t["epochs"], "{:.0f}") + missed, spread(t["epochs_ratio_vs_none"], "{:.2f}")]
            cell += [
                spread(row["to_none_best"]["seconds"], "{:.0f}"),
                spread(row["final_best"], "{:.4f}"),
                spread(row["final_best_delta_points"], "{:+.2f}"),
                spread(row["epochs_total"], "{:.0f}"),
                spread(row["epochs_total_ratio_vs_none"], "{:.2f}"),
                spread(row["pruned"], "{:.0f}"),
                spread(row["seconds_total"], "{:.0f}"),
            ]
            cells.append(cell)
    columns = ["sampler", "pruner"]
    for g in [*targets, "none's best"]:
        columns += [f"epochs to {g}", "vs none"]
    columns += ["s to none's best", "final best", "Δ best (points)", "epochs total", "vs none", "pruned", "s total"]
    table(
        f"pruning: digits, {budget}, {WORKERS} workers, seeds {seeds}; "
        "median (min-max) over seeds; ratios per seed against no pruning",
        columns,
        cells,
    )
    return rows


def main() -> None:
    p = parser("pruning", __doc__)
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="val_acc targets to reach")
    p.add_argument(
        "--trials", type=int, default=None, help=f"trials per study, the fixed budget (default {TRIALS}; --quick 4)"
    )
    p.add_argument("--epochs", type=int, default=None, help=f"trainer.max_epochs (default {EPOCHS}; --quick 2)")
    p.add_argument("--seed-step", type=int, default=SEED_STEP, help="distance between the seeds of repetitions")
    p.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=["study"], help="samplers to run")
    p.add_argument(
        "--pruners", nargs="+", choices=list(PRUNERS), help="pruners to run (default: all; --quick: none, median)"
    )
    args = p.parse_args()
    reps = args.reps or SEEDS
    if args.quick:
        reps = 1
    args.trials = args.trials or (4 if args.quick else TRIALS)
    args.epochs = args.epochs or (2 if args.quick else EPOCHS)
    seeds = [i * args.seed_step for i in range(reps)]
    chosen = args.pruners or (["none", "median"] if args.quick else list(PRUNERS))
    pruners = ["none", *[q for q in chosen if q != "none"]]  # the baseline every ratio is against
    checked = check_specs(args.samplers, trials=args.trials, epochs=args.epochs)

    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    interrupted = False
    tmp = tempfile.mkdtemp(prefix="bench-pruning-")
    try:
        for sampler in args.samplers:
            for seed in seeds:
                for pruner in pruners:  # side by side, so a change in load hits every pruner alike
                    run = run_study(
                        Path(tmp), seed=seed, trials=args.trials, epochs=args.epochs, sampler=sampler, pruner=pruner
                    )
                    m = measure(run["trials"], args.targets)
                    results[sampler, pruner, seed] = {**m, "launch_s": round(run["launch_s"], 1)}
                    shown = {k: m[k] for k in ("to_target", "final_best", "epochs_total", "seconds_total", "pruned")}
                    print(f"{sampler} {pruner} seed {seed}: {shown} epochs {m['epochs_per_trial']}", flush=True)
    except KeyboardInterrupt:  # on a busy machine: the table of the seeds every sampler and pruner finished
        interrupted = True
        seeds = [s for s in seeds if all((a, q, s) in results for a in args.samplers for q in pruners)]
        print(f"interrupted: summarizing seeds {seeds}", flush=True)
        if not seeds:
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = report(results, args.samplers, pruners, seeds, args.targets, f"{args.trials} trials x {args.epochs} epochs")
    write_jsonl(
        args.out,
        "pruning",
        rows,
        quick=args.quick,
        targets=args.targets,
        trials=args.trials,
        epochs=args.epochs,
        workers=WORKERS,
        seeds=seeds,
        interrupted=interrupted,
        checked_specs=checked,
    )


if __name__ == "__main__":
    main()
