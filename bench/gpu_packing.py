"""GPU packing: trials per hour on one GPU with k = 1, 2, 4 trials per GPU and ``auto``, and the
per-trial overhead with CUDA. Run it where a GPU is: without a CUDA device it says so and exits 2.

Packing: the same enqueued digits configurations (a ConvNet, a few epochs on ``cuda:0``) run by
``lightstudy run --gpus 0 --trials-per-gpu K`` for K in 1, 2, 4 and ``auto``, each on a fresh
SQLite study. Per K: trials/hour over the whole command (start-up included) and over the trials
(first start to last end), the largest peak memory a trial recorded (``gpu_memory``), how many
trials ran at once at most, and out-of-memory retries.

Overhead: trivial trials (one training and one validation batch) on the GPU, run by an in-process
``study.optimize`` loop with a Trainer per trial and by ``lightstudy run --gpus 0``; per-trial wall
is the gap between successive trials' ends (the first trial is the warm-up); the overhead is the
difference, with where a lightstudy trial's time goes (its ``timings``).

    python bench/gpu_packing.py             # 16 trials x 4 modes + overhead: minutes on an H100
    python bench/gpu_packing.py --quick     # a few trials: checks the script
    python bench/gpu_packing.py --quick --stand-in   # on the CPU with the tests' stand-in GPU
                                                     # memory: checks the script here; numbers mean nothing
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

from _common import digits_spec, parser, spread, stats, table, write_jsonl

MODES = ("1", "2", "4", "auto")
SEED = 0
ACCELERATOR = "gpu"  # "cpu" with --stand-in
# --stand-in: a 16 GiB GPU whose trials peak at 3 GiB (gpu_share.FakeProbe): auto packs 3 a GPU
STAND_IN = {"total": 16 * 2**30, "peak": 3 * 2**30}


def cuda_devices() -> int:
    """CUDA devices this process sees, counted through NVML (no CUDA context is created)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    try:
        import torch
    except ImportError:
        return 0
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def gpu_spec(name: str, lrs: list[float], epochs: int, tiny: bool) -> dict[str, Any]:
    doc = digits_spec(name, n_trials=len(lrs), epochs=epochs, tiny=tiny, seed=SEED)
    doc["trainer"].update(accelerator=ACCELERATOR, devices=1, deterministic=False)
    if not tiny:
        doc["model"]["init_args"] = {"channels": 32, "hidden": 256}
    doc["study"]["enqueue"] = [{"model.init_args.lr": lr} for lr in lrs]
    doc["study"]["heartbeat_interval"] = 5
    return doc


def learning_rates(n: int) -> list[float]:
    return [1e-3 * 30 ** ((i + 0.5) / n) for i in range(n)]


def run_study(doc: dict[str, Any], work: Path, trials_per_gpu: str) -> dict[str, Any]:
    """``lightstudy run --gpus 0 --trials-per-gpu K`` of ``doc``; what its trials recorded."""
    import optuna
    import yaml

    name = doc["study"]["name"]
    folder = work / name
    folder.mkdir(parents=True)
    spec = folder / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    url = f"sqlite:///{folder / 'study.db'}"
    cmd = [sys.executable, "-m", "lightstudy", "run", str(spec), "--storage", url, "--gpus", "0"]
    cmd += ["--trials-per-gpu", trials_per_gpu, "--run-dir", str(folder / "run")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - started
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = sorted(optuna.load_study(study_name=name, storage=url).trials, key=lambda t: t.number)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    memory = [t.user_attrs.get("gpu_memory") or {} for t in trials]
    ran = sorted((m["ran"][0], m["ran"][1]) for m in memory if m.get("ran"))
    first = min((t.datetime_start.timestamp() for t in trials if t.datetime_start), default=started)
    last = max((t.datetime_complete.timestamp() for t in complete if t.datetime_complete), default=started)
    ends = sorted(t.datetime_complete.timestamp() for t in complete if t.datetime_complete)
    return {
        "rc": done.returncode,
        "output": (done.stdout + done.stderr)[-3000:],
        "wall_s": wall,
        "complete": len(complete),
        "trials_per_hour": len(complete) / wall * 3600 if wall else 0.0,
        "trials_per_hour_training": len(complete) / (last - first) * 3600 if last > first else 0.0,
        "peak_gib": max((m.get("peak", 0) for m in memory), default=0) / 2**30,
        "total_gib": max((m.get("total", 0) for m in memory), default=0) / 2**30,
        "at_once": most_at_once(ran),
        "oom_retries": sum(bool(m.get("oom")) for m in memory),
        "fractions": sorted({m.get("fraction") for m in memory if m.get("fraction") is not None}),
        "ends": ends,
        "timings": [t.user_attrs.get("timings") or {} for t in complete],
        "packing_line": next((line for line in done.stdout.splitlines() if "trial(s) at once" in line), None),
    }


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one time."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def loop_child(n: int, work: Path) -> None:
    """The in-process loop (run as a child process): n trivial trials on cuda, their end times."""
    import lightning.pytorch as lp
    import optuna

    from lightstudy.examples import ConvNet, DigitsDataModule

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{work / 'loop.db'}", direction="maximize")
    for lr in learning_rates(n):
        study.enqueue_trial({"lr": lr})
    trainer_args = gpu_spec("x", [0.01], 1, True)["trainer"]
    ends: list[float] = []

    def objective(trial: Any) -> float:
        from optuna_integration import PyTorchLightningPruningCallback

        lr = trial.suggest_float("lr", 1e-3, 3e-2, log=True)
        lp.seed_everything(SEED + trial.number, verbose=False)
        trainer = lp.Trainer(
            **trainer_args,
            logger=True,
            enable_checkpointing=False,
            callbacks=[PyTorchLightningPruningCallback(trial, monitor="val_acc")],
            default_root_dir=str(work / "loop"),
        )
        trainer.fit(ConvNet(lr=lr, channels=4, hidden=8), datamodule=DigitsDataModule(batch_size=64))
        return float(trainer.callback_metrics["val_acc"])

    study.optimize(objective, n_trials=n, callbacks=[lambda s, t: ends.append(time.time())])
    print(json.dumps({"ends": ends}))


def gaps(ends: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(ends)]


def overhead(n: int, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--loop-child", str(n), "--work", str(work)]
    loop = subprocess.run([*cmd, *(["--stand-in"] if ACCELERATOR == "cpu" else [])], capture_output=True, text=True)
    if loop.returncode != 0:
        raise SystemExit(f"the in-process loop failed:\n{loop.stderr[-3000:]}")
    loop_gaps = gaps(json.loads(loop.stdout.strip().splitlines()[-1])["ends"])
    ours = run_study(gpu_spec("gpu-overhead", learning_rates(n), 1, True), work, "1")
    our_gaps = gaps(ours["ends"])
    parts: dict[str, list[float]] = {}
    for timings in ours["timings"][1:]:
        for key, value in timings.items():
            parts.setdefault(key, []).append(value * 1000)
    loop_s, our_s = stats(loop_gaps), stats(our_gaps)
    return {
        "comparison": "overhead",
        "loop_s": loop_s,
        "ours_s": our_s,
        "overhead_ms": (our_s["median"] - loop_s["median"]) * 1000,
        "parts_ms": {k: stats(v) for k, v in parts.items()},
        "rc": ours["rc"],
    }


def main() -> None:
    p = parser("gpu_packing", __doc__)
    p.add_argument("--trials", type=int, default=None, help="trials per mode (default 16; --quick 4)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per packing trial")
    p.add_argument("--modes", nargs="*", default=list(MODES), help="--trials-per-gpu values to compare")
    p.add_argument("--stand-in", action="store_true", help="CPU trials, stand-in GPU memory: checks the script")
    p.add_argument("--loop-child", type=int, default=None, help=argparse_suppress())
    p.add_argument("--work", type=Path, default=None, help=argparse_suppress())
    args = p.parse_args()
    global ACCELERATOR
    if args.stand_in:
        ACCELERATOR = "cpu"
        os.environ["LIGHTSTUDY_FAKE_GPU_MEMORY"] = json.dumps(STAND_IN)  # gpu_share.FAKE_VAR
    if args.loop_child is not None:
        loop_child(args.loop_child, args.work)
        return
    if not args.stand_in and cuda_devices() == 0:
        print(
            "no CUDA device: bench/gpu_packing.py measures GPU packing on one GPU; "
            "run it on a machine with one (CUDA_VISIBLE_DEVICES unset or naming it)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    n = args.trials or (4 if args.quick else 16)
    epochs = 1 if args.quick else args.epochs
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-packing-") as tmp:
        work = Path(tmp)
        for mode in args.modes:
            result = run_study(gpu_spec(f"gpu-pack-{mode}", learning_rates(n), epochs, False), work, mode)
            if result["rc"] != 0:
                print(f"--trials-per-gpu {mode}: lightstudy run exited {result['rc']}\n{result['output']}")
            rows.append(
                {
                    "comparison": "packing",
                    "trials_per_gpu": mode,
                    **{k: v for k, v in result.items() if k not in ("ends", "timings", "output")},
                }
            )
        rows.append(overhead(max(3, n // 2), work))
    packed = [r for r in rows if r["comparison"] == "packing"]
    base = next((r["trials_per_hour_training"] for r in packed if r["trials_per_gpu"] == "1"), None)
    table(
        f"trials/hour on one GPU ({n} trials x {epochs} epochs each)",
        [
            "--trials-per-gpu",
            "trials/h (whole run)",
            "trials/h (training)",
            "x k=1",
            "at once",
            "peak GiB",
            "cap",
            "OOM retries",
            "complete",
        ],
        [
            [
                r["trials_per_gpu"],
                f"{r['trials_per_hour']:.0f}",
                f"{r['trials_per_hour_training']:.0f}",
                f"{r['trials_per_hour_training'] / base:.2f}" if base else "-",
                r["at_once"],
                f"{r['peak_gib']:.2f} of {r['total_gib']:.0f}",
                ",".join(f"{f:.0%}" for f in r["fractions"]) or "-",
                r["oom_retries"],
                f"{r['complete']}/{n}",
            ]
            for r in packed
        ],
    )
    o = rows[-1]
    table(
        "per-trial overhead with CUDA (trivial trial: 1 batch)",
        ["in-process loop s", "lightstudy s", "overhead ms", *sorted(o["parts_ms"])],
        [
            [
                spread(o["loop_s"]),
                spread(o["ours_s"]),
                f"{o['overhead_ms']:.0f}",
                *[spread(o["parts_ms"][k], "{:.0f}") for k in sorted(o["parts_ms"])],
            ]
        ],
    )
    write_jsonl(args.out, "gpu_packing", rows, quick=args.quick, trials=n, epochs=epochs, stand_in=args.stand_in)


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
