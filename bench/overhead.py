"""Trial overhead: per-trial wall time of the same digits trials run five ways.

For each workload (a trivial trial: one training and one validation batch; 1 epoch; 10 epochs)
the same trials (same learning rates, seeds and epochs; no pruning; one torch thread) run as:

  plain     a PyTorch loop over the same model and data (no Lightning)
  lean      a lean Lightning Trainer (no logger, no checkpoints)
  optuna    an in-process ``study.optimize`` on SQLite with optuna_integration's
            PyTorchLightningPruningCallback, as optuna-examples does it
  fresh     a fresh Python interpreter per trial (it loads the trial from SQLite; the driver tells)
  lightstudy  a real ``lightstudy run --workers 1`` on SQLite (trials forked from its warm
            process, LightningCLI, checkpoints, TensorBoard, heartbeat, top-k upload, retention)

Each method runs one warm-up trial first (not counted: imports and first-use caches); per-trial
wall is the time from one trial's end (after ``tell``) to the next one's, so sampling, storage
and everything between trials counts. lightstudy's one-time start (launcher, warm process,
worker) is reported separately, with where a lightstudy trial's time goes (from its ``timings``).

Whole process, what a user waits for: the ``lightstudy run`` above from the command to its exit,
against the in-process ``study.optimize`` (optuna) as a script of its own (``python`` that
imports what it needs, then trains the same trials, warm-up trial included), command to exit.

    python bench/overhead.py                  # three workloads, about 6 minutes on 2 cores
    python bench/overhead.py --quick          # trivial trials only, a few of each
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, digits_spec, parser, spread, stats, table, write_jsonl

SEED = 0  # trial i uses seed SEED + i (as lightstudy does with study.seed = SEED)
LR_LOW, LR_HIGH = 1e-3, 3e-2  # the search space of every method (values are fixed, enqueued)
METHODS = ("plain", "lean", "optuna", "fresh", "lightstudy")
FRESH_TRIALS = 3  # a fresh interpreter costs seconds a trial: its first trials are enough to see that
TARGET_RATIO = 1.15  # lightstudy / in-process optuna at 10 epochs
TARGET_OVERHEAD_MS = 40.0  # issue 14: lightstudy trivial minus in-process trivial, ms a trial


def workloads(quick: bool) -> list[dict[str, Any]]:
    """(name, epochs, tiny, measured trials); each method adds one warm-up trial."""
    if quick:
        return [{"name": "trivial", "epochs": 1, "tiny": True, "trials": 2}]
    return [
        {"name": "trivial", "epochs": 1, "tiny": True, "trials": 12},
        {"name": "1 epoch", "epochs": 1, "tiny": False, "trials": 6},
        {"name": "10 epochs", "epochs": 10, "tiny": False, "trials": 4},
    ]


def learning_rates(n: int) -> list[float]:
    """``n`` fixed learning rates spread over the search space (log scale)."""
    ratio = LR_HIGH / LR_LOW
    return [LR_LOW * ratio ** ((i + 0.5) / n) for i in range(n)]


def trainer_args(epochs: int, tiny: bool) -> dict[str, Any]:
    """The Trainer arguments of ``digits_spec`` (CPU, deterministic, no bars)."""
    return dict(digits_spec("x", n_trials=1, epochs=epochs, tiny=tiny)["trainer"])


def model_args(tiny: bool) -> dict[str, Any]:
    return dict(digits_spec("x", n_trials=1, epochs=1, tiny=tiny)["model"]["init_args"])


def intervals(ends: list[float]) -> list[float]:
    """Per-trial wall: end-to-end gaps, the warm-up trial (the first end) being the origin."""
    return [b - a for a, b in itertools.pairwise(ends)]


# --- (a) plain PyTorch ---------------------------------------------------------------------------


def run_plain(lrs: list[float], epochs: int, tiny: bool) -> tuple[list[float], list[float]]:
    import lightning.pytorch as lp
    import torch
    import torch.nn.functional as F

    from lightstudy.examples import ConvNet, DigitsDataModule

    ends, values = [time.time()], []
    limit = 1 if tiny else None
    for i, lr in enumerate(lrs):
        lp.seed_everything(SEED + i, verbose=False)
        torch.use_deterministic_algorithms(True)
        model = ConvNet(lr=lr, **model_args(tiny))
        data = DigitsDataModule(batch_size=64)
        data.setup("fit")
        opt = model.configure_optimizers()
        acc = 0.0
        for _ in range(epochs):
            model.train()
            for b, (x, y) in enumerate(data.train_dataloader()):
                if limit is not None and b >= limit:
                    break
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            model.eval()
            right = total = 0
            with torch.no_grad():
                for b, (x, y) in enumerate(data.val_dataloader()):
                    if limit is not None and b >= limit:
                        break
                    right += int((model(x).argmax(1) == y).sum())
                    total += len(y)
            acc = right / total
        values.append(acc)
        ends.append(time.time())
    return ends[1:], values


# --- (b) lean Lightning Trainer ------------------------------------------------------------------


def run_lean(lrs: list[float], epochs: int, tiny: bool, work: Path) -> tuple[list[float], list[float]]:
    import lightning.pytorch as lp

    from lightstudy.examples import ConvNet, DigitsDataModule

    ends, values = [], []
    for i, lr in enumerate(lrs):
        lp.seed_everything(SEED + i, verbose=False)
        trainer = lp.Trainer(
            **trainer_args(epochs, tiny),
            logger=False,
            enable_checkpointing=False,
            default_root_dir=str(work / "lean"),
        )
        trainer.fit(ConvNet(lr=lr, **model_args(tiny)), datamodule=DigitsDataModule(batch_size=64))
        values.append(float(trainer.callback_metrics["val_acc"]))
        ends.append(time.time())
    return ends, values


# --- (c) in-process study.optimize, (d) a fresh interpreter per trial ----------------------------


def objective(trial: Any, epochs: int, tiny: bool, root: Path) -> float:
    """The optuna-examples objective: a Trainer with the pruning callback and the default logger."""
    import lightning.pytorch as lp
    from optuna_integration import PyTorchLightningPruningCallback

    from lightstudy.examples import ConvNet, DigitsDataModule

    lr = trial.suggest_float("lr", LR_LOW, LR_HIGH, log=True)
    lp.seed_everything(SEED + trial.number, verbose=False)
    trainer = lp.Trainer(
        **trainer_args(epochs, tiny),
        logger=True,
        enable_checkpointing=False,
        callbacks=[PyTorchLightningPruningCallback(trial, monitor="val_acc")],
        default_root_dir=str(root),
    )
    trainer.fit(ConvNet(lr=lr, **model_args(tiny)), datamodule=DigitsDataModule(batch_size=64))
    return float(trainer.callback_metrics["val_acc"])


def _optuna_study(url: str, lrs: list[float]) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=url,
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(SEED),
        pruner=optuna.pruners.NopPruner(),
    )
    for lr in lrs:
        study.enqueue_trial({"lr": lr})
    return study


def run_optuna(lrs: list[float], epochs: int, tiny: bool, work: Path) -> tuple[list[float], list[float]]:
    study = _optuna_study(f"sqlite:///{work / 'optuna.db'}", lrs)
    ends: list[float] = []
    study.optimize(
        lambda t: objective(t, epochs, tiny, work / "optuna"),
        n_trials=len(lrs),
        callbacks=[lambda s, t: ends.append(time.time())],
    )
    return ends, [t.value for t in study.trials]


def run_fresh(lrs: list[float], epochs: int, tiny: bool, work: Path) -> tuple[list[float], list[float]]:
    url = f"sqlite:///{work / 'fresh.db'}"
    study = _optuna_study(url, lrs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ends, values = [], []
    for _ in lrs:
        trial = study.ask()
        job = {"url": url, "study": study.study_name, "trial_id": trial._trial_id, "epochs": epochs, "tiny": tiny}
        job["root"] = str(work / "fresh")
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(job)], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"the trial process failed:\n{done.stderr[-3000:]}")
        value = float(done.stdout.strip().splitlines()[-1])
        study.tell(trial, value)
        values.append(value)
        ends.append(time.time())
    return ends, values


def child(job: dict[str, Any]) -> None:
    """(d)'s trial process: load the trial, run the objective, print the value."""
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=job["study"], storage=job["url"], pruner=optuna.pruners.NopPruner())
    study.get_trials(deepcopy=False)  # Optuna's cached storage knows a trial only once it read it
    value = objective(optuna.Trial(study, job["trial_id"]), job["epochs"], job["tiny"], Path(job["root"]))
    print(value)


# --- (e) lightstudy ------------------------------------------------------------------------------


def run_loop_script(lrs: list[float], epochs: int, tiny: bool, work: Path) -> float:
    """(c) as a script of its own: wall seconds from the command to its exit."""
    job = {"lrs": lrs, "epochs": epochs, "tiny": tiny, "work": str(work)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    cmd = [sys.executable, __file__, "--loop", json.dumps(job)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the in-process loop failed:\n{done.stderr[-3000:]}")
    return time.time() - start


def loop_script(job: dict[str, Any]) -> None:
    """The in-process loop's process: imports, then (c) on the job's trials."""
    import torch

    torch.set_num_threads(1)
    run_optuna(job["lrs"], job["epochs"], job["tiny"], Path(job["work"]))


def run_lightstudy(lrs: list[float], epochs: int, tiny: bool, work: Path) -> dict[str, Any]:
    """A real ``lightstudy run --workers 1`` on SQLite; per-trial wall from the trials' completion times."""
    import optuna
    import yaml

    name = f"overhead-{epochs}-{int(tiny)}"
    doc = digits_spec(name, n_trials=len(lrs), epochs=epochs, tiny=tiny, seed=SEED)
    doc["study"]["enqueue"] = [{"model.init_args.lr": lr} for lr in lrs]
    url = f"sqlite:///{work / name / 'study.db'}"
    doc["study"].update(storage=url, run_dir=str(work / name))
    spec = work / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launched = time.time()
    worker = subprocess.run(
        [sys.executable, "-m", "lightstudy", "run", str(spec), "--workers", "1", "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
    )
    exited = time.time()
    if worker.returncode != 0:
        worker.stderr += "\n".join(p.read_text()[-2000:] for p in (work / name / "workers").glob("*.log"))
    trials = sorted(optuna.load_study(study_name=name, storage=url).trials, key=lambda t: t.number)
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete is not None]
    per_trial = intervals(ends)
    parts: dict[str, list[float]] = {}
    for t, wall in zip(trials[1:], per_trial):
        timings = dict(t.user_attrs.get("timings") or {})
        timings["other"] = wall - sum(v for k, v in timings.items() if k != "save")
        for key, value in timings.items():
            parts.setdefault(key, []).append(value)
    typical = stats(per_trial)["median"] if per_trial else 0.0
    return {
        "ends": ends,
        "values": [t.value for t in trials],
        "states": [t.state.name for t in trials],
        "numbers": [t.number for t in trials],
        "worker_rc": worker.returncode,
        "worker_errors": worker.stdout.count("Traceback") + worker.stderr.count("Traceback"),
        "worker_log": worker.stderr[-2000:],
        # the first trial's wall beyond a typical trial: launcher, warm process and worker start
        "start_s": (ends[0] - launched - typical) if ends else float("nan"),
        "exit_s": exited - ends[-1] if ends else float("nan"),
        "whole_s": exited - launched,
        "parts": parts,
    }


# --- the run -------------------------------------------------------------------------------------


def measure(load: dict[str, Any], work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import lightning.pytorch as lp

    lrs = learning_rates(load["trials"] + 1)  # trial 0 warms up
    epochs, tiny = load["epochs"], load["tiny"]
    rows: list[dict[str, Any]] = []
    ls: dict[str, Any] = {}
    for method in METHODS:
        where = work / f"{load['name'].replace(' ', '')}-{method}"
        where.mkdir(parents=True)
        errors = 0
        if method == "plain":
            ends, values = run_plain(lrs, epochs, tiny)
        elif method == "lean":
            ends, values = run_lean(lrs, epochs, tiny, where)
        elif method == "optuna":
            ends, values = run_optuna(lrs, epochs, tiny, where)
        elif method == "fresh":
            ends, values = run_fresh(lrs[: FRESH_TRIALS + 1], epochs, tiny, where)
        else:
            ls = run_lightstudy(lrs, epochs, tiny, where)
            ends, values = ls["ends"], ls["values"]
            errors = sum(s != "COMPLETE" for s in ls["states"]) + ls["worker_errors"] + (ls["worker_rc"] != 0)
            errors += len(ls["states"]) != len(lrs)
        per_trial = intervals(ends)
        errors += len(per_trial) != min(load["trials"], FRESH_TRIALS if method == "fresh" else load["trials"])
        rows.append(
            {
                "workload": load["name"],
                "epochs": epochs,
                "tiny": tiny,
                "method": method,
                "trials": len(per_trial),
                "per_trial_s": stats(per_trial),
                "values": [round(v, 4) if v is not None else None for v in values[1:]],
                "errors": errors,
            }
        )
        lp.seed_everything(0, verbose=False)
    where = work / f"{load['name'].replace(' ', '')}-script"
    where.mkdir(parents=True)
    ls["script_s"] = run_loop_script(lrs, epochs, tiny, where)
    base = rows[METHODS.index("optuna")]["per_trial_s"]["median"]
    for row in rows:
        row["ratio_vs_optuna"] = row["per_trial_s"]["median"] / base
        row["overhead_vs_optuna_ms"] = (row["per_trial_s"]["median"] - base) * 1000
    return rows, ls


def main() -> None:
    p = parser("overhead", __doc__)
    p.add_argument("--child", help=argparse_suppress())
    p.add_argument("--loop", help=argparse_suppress())
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.loop:
        loop_script(json.loads(args.loop))
        return
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 (it sets its loggers' levels on import; quiet them after)
    import torch

    torch.set_num_threads(1)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows: list[dict[str, Any]] = []
    breakdown: list[dict[str, Any]] = []
    whole: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for load in workloads(args.quick):
            load["trials"] = args.reps or load["trials"]  # each measured trial is one repetition
            got, ls = measure(load, Path(tmp))
            rows += got
            parts = {k: stats(v) for k, v in ls.get("parts", {}).items()}
            breakdown.append(
                {
                    "workload": load["name"],
                    "method": "lightstudy breakdown",
                    "start_s": ls.get("start_s"),
                    "exit_s": ls.get("exit_s"),
                    "parts_s": parts,
                    "errors": 0,
                }
            )
            whole.append(
                {
                    "workload": load["name"],
                    "method": "whole process",
                    "trials": load["trials"] + 1,
                    "lightstudy_s": ls.get("whole_s"),
                    "script_s": ls.get("script_s"),
                    "ratio": ls["whole_s"] / ls["script_s"] if ls.get("script_s") else float("nan"),
                    "errors": 0,
                }
            )
            if ls.get("worker_rc"):
                print(ls.get("worker_log"), file=sys.stderr)
    table(
        "per-trial wall time, s: median (min-max); ratio to in-process optuna",
        ["workload", "method", "trials", "per trial s", "ratio", "+ms vs optuna", "errors"],
        [
            [
                r["workload"],
                r["method"],
                r["trials"],
                spread(r["per_trial_s"]),
                f"{r['ratio_vs_optuna']:.2f}",
                f"{r['overhead_vs_optuna_ms']:+.0f}",
                r["errors"],
            ]
            for r in rows
        ],
    )
    keys = ["claim", "prepare", "start", "storage", "setup", "fit", "save", "checkpoint", "other"]
    table(
        "where a lightstudy trial's time goes, ms (median); save is inside fit; other: tell, retention, sweep",
        ["workload", "worker start s", *keys],
        [
            [
                b["workload"],
                f"{b['start_s']:.2f}",
                *[f"{b['parts_s'][k]['median'] * 1000:.0f}" if k in b["parts_s"] else "-" for k in keys],
            ]
            for b in breakdown
        ],
    )
    table(
        "whole process, command to exit, s (the trials above, warm-up trial included)",
        ["workload", "trials", "lightstudy run --workers 1", "in-process loop script", "ratio"],
        [
            [w["workload"], w["trials"], f"{w['lightstudy_s']:.1f}", f"{w['script_s']:.1f}", f"{w['ratio']:.2f}"]
            for w in whole
        ],
    )
    summary = targets(rows)
    table("targets", ["target", "measured", "met"], [[s["target"], s["measured"], s["met"]] for s in summary])
    write_jsonl(args.out, "overhead", [*rows, *breakdown, *whole, *summary], quick=args.quick)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target whose workload ran: what it asks, what was measured, whether it is met."""
    by = {(r["workload"], r["method"]): r for r in rows}
    out = []
    if ("10 epochs", "lightstudy") in by:
        ratio = by[("10 epochs", "lightstudy")]["ratio_vs_optuna"]
        out.append(
            _target(
                f"lightstudy / in-process optuna at 10 epochs <= {TARGET_RATIO}", f"{ratio:.3f}", ratio <= TARGET_RATIO
            )
        )
    if ("trivial", "lightstudy") in by:
        ms = by[("trivial", "lightstudy")]["overhead_vs_optuna_ms"]
        out.append(
            _target(
                f"service overhead per trivial trial <= {TARGET_OVERHEAD_MS:g} ms",
                f"{ms:.0f} ms",
                ms <= TARGET_OVERHEAD_MS,
            )
        )
    return out


def _target(target: str, measured: str, met: bool) -> dict[str, Any]:
    return {"method": "target", "target": target, "measured": measured, "met": met, "errors": 0}


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    os.chdir(REPO)
    main()
