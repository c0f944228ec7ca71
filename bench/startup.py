"""Whole process: what a user waits for, from the command to its exit, start-up included.

Each comparison runs its commands side by side in this one invocation, on the same digits
configurations (enqueued learning rates and seeds, pruning off, SQLite, one torch thread per
trial process), timing each process from its launch to its exit:

  loop     ``lightstudy run SPEC --workers 1`` against an in-process ``study.optimize`` script
           (the optuna-examples objective: the pruning callback, no checkpointing), a fresh
           ``python`` process that imports what it needs; N configurations x E epochs each
  first    a 1-trial, 1-batch ``lightstudy run`` against ``python -c "import torch,
           lightning.pytorch, torchmetrics, optuna"``: the time to a first result over the
           imports every trial needs anyway
  workers  4 local workers x 1 trivial trial each against 1 worker x 1 trivial trial

The targets are issue 14's (loop <= 1.05, first <= 1.5, workers <= 1.3); a row says whether it
is met. Repetitions alternate the commands, so a loaded machine slows both sides alike.

    python bench/startup.py              # 12 configurations x 12 epochs; about 6 minutes on 2 cores
    python bench/startup.py --quick      # 2 configurations x 1 epoch, one repetition
    python bench/startup.py --before ../main/src   # also each lightstudy side on another checkout's
                                                   # source, alternated with this one's: before/after
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, digits_spec, parser, stats, table, write_jsonl

SEED = 0
LR_LOW, LR_HIGH = 1e-3, 3e-2
TARGETS = {"loop": 1.05, "first": 1.5, "workers": 1.3}
IMPORTS = "import torch, lightning.pytorch, torchmetrics, optuna"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# The in-process loop a user would write (optuna-examples' Lightning example, on the same
# model, data, trainer settings and enqueued learning rates as the lightstudy study).
LOOP = """
import json, sys
job = json.loads(sys.argv[1])
import lightning.pytorch as lp
import optuna
import torch
from optuna_integration import PyTorchLightningPruningCallback
from lightstudy.examples import ConvNet, DigitsDataModule

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

def objective(trial):
    lr = trial.suggest_float("model.init_args.lr", job["low"], job["high"], log=True)
    lp.seed_everything(job["seed"] + trial.number, verbose=False)
    trainer = lp.Trainer(**job["trainer"], logger=True, enable_checkpointing=False,
                         callbacks=[PyTorchLightningPruningCallback(trial, monitor="val_acc")],
                         default_root_dir=job["root"])
    trainer.fit(ConvNet(lr=lr, **job["model"]), datamodule=DigitsDataModule(**job["data"]))
    return float(trainer.callback_metrics["val_acc"])

study = optuna.create_study(storage=job["url"], direction="maximize",
                            sampler=optuna.samplers.RandomSampler(job["seed"]), pruner=optuna.pruners.NopPruner())
for lr in job["lrs"]:
    study.enqueue_trial({"model.init_args.lr": lr})
study.optimize(objective, n_trials=len(job["lrs"]))
print(json.dumps([t.value for t in study.trials]))
"""


def learning_rates(n: int) -> list[float]:
    """``n`` fixed learning rates spread over the search space (log scale)."""
    return [LR_LOW * (LR_HIGH / LR_LOW) ** ((i + 0.5) / n) for i in range(n)]


def timed(cmd: list[str], cwd: Path, src: str | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall seconds from launch to exit of ``cmd`` (lightstudy imported from ``src`` when given);
    raises with its output when it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=_env(src), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return wall, done


def _env(src: str | None) -> dict[str, str]:
    """The benchmark's environment, lightstudy imported from ``src`` when given."""
    env = {**os.environ, **ENV}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env


_THREADS: dict[str | None, list[str]] = {}


def one_thread(src: str | None) -> list[str]:
    """``--threads 1`` (one torch thread per trial, as the loop script has), where the lightstudy
    of ``src`` has that option (before it, ``run`` gave a lone worker every core: on 2 cores, 2)."""
    if src not in _THREADS:
        done = subprocess.run(
            [sys.executable, "-m", "lightstudy", "run", "--help"], env=_env(src), capture_output=True, text=True
        )
        _THREADS[src] = ["--threads", "1"] if "--threads" in done.stdout else []
    return _THREADS[src]


def lightstudy_run(
    work: Path, name: str, lrs: list[float], epochs: int, tiny: bool, workers: int, src: str | None = None
) -> float:
    """``lightstudy run`` of a fresh study of the enqueued ``lrs``; checks every trial completed."""
    import optuna
    import yaml

    folder = work / name
    folder.mkdir(parents=True)
    doc = digits_spec(name, n_trials=len(lrs), epochs=epochs, tiny=tiny, seed=SEED)
    doc["study"]["enqueue"] = [{"model.init_args.lr": lr} for lr in lrs]
    doc["study"]["storage"] = f"sqlite:///{folder / 'study.db'}"
    doc["study"]["run_dir"] = str(folder)
    spec = folder / "study.yaml"
    spec.write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "lightstudy", "run", str(spec), "--workers", str(workers), *one_thread(src)]
    wall, _ = timed(cmd, work, src)
    trials = optuna.load_study(study_name=name, storage=doc["study"]["storage"]).trials
    states = sorted(t.state.name for t in trials)
    if states != ["COMPLETE"] * len(lrs):
        raise RuntimeError(f"{name}: expected {len(lrs)} COMPLETE trials, got {states}")
    return wall


def in_process_loop(work: Path, name: str, lrs: list[float], epochs: int, tiny: bool) -> float:
    """The in-process ``study.optimize`` script on the same configurations, as a fresh process."""
    doc = digits_spec(name, n_trials=len(lrs), epochs=epochs, tiny=tiny, seed=SEED)
    folder = work / name
    folder.mkdir(parents=True)
    job = {
        "url": f"sqlite:///{folder / 'optuna.db'}",
        "lrs": lrs,
        "low": LR_LOW,
        "high": LR_HIGH,
        "seed": SEED,
        "trainer": doc["trainer"],
        "model": doc["model"]["init_args"],
        "data": doc["data"]["init_args"],
        "root": str(folder),
    }
    wall, done = timed([sys.executable, "-c", LOOP, json.dumps(job)], work)
    values = json.loads(done.stdout.strip().splitlines()[-1])
    if len(values) != len(lrs) or None in values:
        raise RuntimeError(f"{name}: the loop finished {values}")
    return wall


def comparisons(quick: bool) -> dict[str, dict[str, Any]]:
    """Per comparison: its two sides, each (a name, a function of (work folder, tag, lightstudy's
    source or None) -> wall seconds, whether lightstudy's source matters to it)."""
    n, epochs = (2, 1) if quick else (12, 12)
    lrs = learning_rates(n)
    trivial = learning_rates(4)
    return {
        "loop": {
            "what": f"{n} configurations x {epochs} epochs",
            "ours": (
                "lightstudy run --workers 1",
                lambda w, t, s: lightstudy_run(w, f"loop-{t}", lrs, epochs, False, 1, s),
                True,
            ),
            "base": (
                "in-process study.optimize",
                lambda w, t, s: in_process_loop(w, f"inproc-{t}", lrs, epochs, False),
                False,
            ),
        },
        "first": {
            "what": "1 trial of 1 batch",
            "ours": (
                "lightstudy run, 1 trial",
                lambda w, t, s: lightstudy_run(w, f"first-{t}", trivial[:1], 1, True, 1, s),
                True,
            ),
            "base": ("python -c 'import ...'", lambda w, t, s: timed([sys.executable, "-c", IMPORTS], w)[0], False),
        },
        "workers": {
            "what": "trivial trials, 1 per worker",
            "ours": (
                "4 workers x 1 trial",
                lambda w, t, s: lightstudy_run(w, f"four-{t}", trivial, 1, True, 4, s),
                True,
            ),
            "base": (
                "1 worker x 1 trial",
                lambda w, t, s: lightstudy_run(w, f"one-{t}", trivial[:1], 1, True, 1, s),
                True,
            ),
        },
    }


def main() -> None:
    p = parser("startup", __doc__)
    p.add_argument("--only", choices=sorted(TARGETS), action="append", help="run only these comparisons")
    p.add_argument(
        "--before",
        default=None,
        help="a src folder of another lightstudy checkout: each lightstudy side runs on it too, alternated",
    )
    args = p.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    before = str(Path(args.before).resolve()) if args.before else None
    chosen = {k: v for k, v in comparisons(args.quick).items() if not args.only or k in args.only}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ls-startup-") as tmp:
        work = Path(tmp)
        for key, comp in chosen.items():
            # (side, source): this checkout's source (None), and --before's where it matters
            runs = [("ours", None), ("base", None)]
            if before is not None:
                runs += [(side, before) for side in ("ours", "base") if comp[side][2]]
            walls: dict[tuple[str, str | None], list[float]] = {r: [] for r in runs}
            for rep in range(reps):
                # alternate the order, so drift on a shared machine hits every side alike
                for side, src in runs if rep % 2 == 0 else runs[::-1]:
                    tag = f"{side}{'b' if src else ''}{rep}"
                    walls[side, src].append(comp[side][1](work, tag, src))
            ours, base = stats(walls["ours", None]), stats(walls["base", None])
            row = {
                "comparison": key,
                "what": comp["what"],
                "ours": comp["ours"][0],
                "base": comp["base"][0],
                "ours_s": ours,
                "base_s": base,
                "ratio": ours["median"] / base["median"],
                "target": TARGETS[key],
            }
            row["met"] = row["ratio"] <= TARGETS[key]
            if before is not None:
                ours_before = stats(walls["ours", before])
                base_before = stats(walls["base", before]) if comp["base"][2] else base
                row.update(
                    before=before,
                    ours_before_s=ours_before,
                    base_before_s=base_before,
                    ratio_before=ours_before["median"] / base_before["median"],
                )
            rows.append(row)
    head = ["comparison", "workload", "lightstudy", "s", "baseline", "s", "ratio", "target"]
    if before is not None:
        head += ["before: s", "baseline s", "ratio"]
    table(
        "whole process, command to exit (median of repetitions, seconds)",
        head,
        [
            [
                r["comparison"],
                r["what"],
                r["ours"],
                f"{r['ours_s']['median']:.1f}",
                r["base"],
                f"{r['base_s']['median']:.1f}",
                f"{r['ratio']:.2f}",
                f"<= {r['target']} {'met' if r['met'] else 'missed'}",
                *(
                    [
                        f"{r['ours_before_s']['median']:.1f}",
                        f"{r['base_before_s']['median']:.1f}",
                        f"{r['ratio_before']:.2f}",
                    ]
                    if before is not None
                    else []
                ),
            ]
            for r in rows
        ],
    )
    write_jsonl(args.out, "startup", rows, quick=args.quick, reps=reps, repo=str(REPO), before=before)


if __name__ == "__main__":
    main()
