"""Schedulers against Optuna's pruners on the LCBench surrogate: time to MedianPruner's best, final best, epochs.

An event-driven simulation of ``WORKERS`` workers on YAHPO Gym's LCBench surrogate
(``bench/lcbench/``: 34 OpenML tasks, 7 hyperparameters, epochs 1-52; read with onnxruntime).
Each simulated epoch costs the surrogate's predicted time for that epoch of that configuration,
and each report (step = epoch index, from 0) happens at the simulated time its epoch ends:
events are handled in time order, so a pruner's ``should_prune`` or a scheduler's decision sees
exactly the reports made before it, never one from the future. Every method samples with
Optuna's RandomSampler (the schedulers, not the samplers, are compared) through an in-memory
Optuna study driven by ask/tell:

- ``none``, ``median``, ``sha``, ``hyperband``: Optuna's NopPruner, MedianPruner,
  SuccessiveHalvingPruner and HyperbandPruner (defaults; Hyperband's max_resource 52); a trial
  reports each epoch and stops when ``trial.should_prune()`` says so.
- ``asha``, ``pbt``: ``lightstudy.scheduler.Asha`` and ``Pbt`` (the code the workers will use)
  decide each free worker's next job from ``TrialView.of`` the study's trials; a promotion or an
  exploit is a new trial (``enqueue_trial`` with the job's params and user attrs) that goes on
  from its parent's epoch, as from its checkpoint. Such a trial pays a start-up as a fresh
  one does: the surrogate's first epoch takes longer than its second (set-up, first
  evaluation), and that difference is added before a resumed trial's first epoch.
  PBT caveat: the surrogate knows only configurations trained with fixed parameters, so after
  an exploit a member's epoch ``e`` scores as its new parameters would at epoch ``e``: a coarse
  model of a parameter schedule, so PBT's figures are indicative only.

Budget, the same for every method on a task and seed: the simulated time ``WORKERS`` workers take
to train ``BUDGET_CONFIGS`` random configurations for 52 epochs (their summed time / workers).
No trial starts or reports after it. The best is the highest val_accuracy (percent) reported so
far by any trial at any epoch (the checkpoint of that epoch is what a study keeps). Read per
task and seed: MedianPruner's final best and when it got it; each method's time to reach that
value (as a ratio to MedianPruner's; ``inf`` when never), its final best minus MedianPruner's
(points), and the epochs it trained. Medians over tasks (each task's median over seeds).

    python bench/schedulers.py --jobs 2        # every task, 3 seeds (~10 min on 2 loaded cores)
    python bench/schedulers.py --tasks 3945 7593 --reps 1
    python bench/schedulers.py --free-resume --methods asha pbt   # resuming a checkpoint costs no start-up
    python bench/schedulers.py --methods asha --asha-min-resource 3 --asha-reduction-factor 3
    python bench/schedulers.py --methods asha --budget-configs 64 --reps 1   # a 4x larger budget
    python bench/schedulers.py --quick         # 3 tasks, 1 seed, half the budget (8 configurations)

Every figure is deterministic: the same command prints the same table whatever ``--jobs``.
"""

from __future__ import annotations

import heapq
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, parser, table, write_jsonl

LCBENCH = REPO / "bench" / "lcbench"
EPOCHS = 52  # the surrogate's highest epoch
WORKERS = 4  # simulated workers
BUDGET_CONFIGS = 16  # the budget: this many random configurations trained EPOCHS epochs, on WORKERS workers
SEEDS = 3  # repetitions per task (seeds 0, 1, ...)
QUICK_TASKS = ("3945", "7593", "34539")
METHODS = ("none", "median", "sha", "hyperband", "asha", "pbt")
ASHA = {"name": "ASHA", "min_resource": 1, "max_resource": EPOCHS, "reduction_factor": 3}
# PBT's population is the budget's configurations, so that it trains at most the budget's epochs.
PBT = {"name": "PBT", "interval": 4, "max_resource": EPOCHS, "quantile": 0.25, "resample_probability": 0.25}
# The surrogate's inputs in the order the model reads them (yahpo_gym's lcbench cont_names, epoch first).
CONT = ("epoch", "batch_size", "learning_rate", "momentum", "weight_decay", "num_layers", "max_units", "max_dropout")


def search_space() -> dict[str, Any]:
    """config_space.json's hyperparameters as Optuna distributions (task and epoch left out)."""
    from optuna.distributions import FloatDistribution, IntDistribution

    space = json.loads((LCBENCH / "config_space.json").read_text())
    out: dict[str, Any] = {}
    for hp in space["hyperparameters"]:
        if hp["name"] in ("OpenML_task_id", "epoch"):
            continue
        kind = IntDistribution if hp["type"] == "uniform_int" else FloatDistribution
        out[hp["name"]] = kind(hp["lower"], hp["upper"], log=hp["log"])
    return out


def tasks() -> list[str]:
    space = json.loads((LCBENCH / "config_space.json").read_text())
    return next(hp["choices"] for hp in space["hyperparameters"] if hp["name"] == "OpenML_task_id")


class Surrogate:
    """One task's learning curves: val_accuracy (percent) and the time of each epoch, 52 at a time."""

    def __init__(self, task: str) -> None:
        import onnxruntime as rt

        options = rt.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self.session = rt.InferenceSession(
            str(LCBENCH / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.task = json.loads((LCBENCH / "encoding.json").read_text())["OpenML_task_id"][task]
        self.cache: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}

    def curve(self, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(val_accuracy per epoch, seconds per epoch), index 0 = epoch 1."""
        key = tuple(params[name] for name in CONT[1:])
        if key not in self.cache:
            x = np.array([[e, *key] for e in range(1, EPOCHS + 1)], dtype=np.float32)
            cat = np.full((EPOCHS, 1), self.task, dtype=np.int32)
            out = self.session.run(None, {"x_cat": cat, "x_cont": x})[0]
            cumulative = np.maximum.accumulate(np.maximum(out[:, 0], 0.0))  # time: cumulative seconds
            per_epoch = np.maximum(np.diff(cumulative, prepend=0.0), 1e-3)
            self.cache[key] = (out[:, 1].astype(float), per_epoch.astype(float))
        return self.cache[key]


@dataclass
class Run:
    """One trial on one simulated worker: trains epochs ``start + 1 .. end`` of ``params``."""

    trial: Any
    params: dict[str, Any]
    start: int
    end: int
    epoch: int = 0  # the last epoch it finished

    def __post_init__(self) -> None:
        self.epoch = self.start


@dataclass
class Outcome:
    best: list[tuple[float, float]] = field(default_factory=list)  # (time, best so far) at each improvement
    epochs: int = 0
    trials: int = 0
    ended_s: float = 0.0  # when the last worker went idle for good (or the budget)

    def best_at(self, t: float) -> float:
        return max((b for when, b in self.best if when <= t), default=float("nan"))

    def time_to(self, target: float) -> float:
        return next((when for when, b in self.best if b >= target), math.inf)


class Policy:
    """What runs on a free worker and whether a trial goes on after a report."""

    def start(self) -> Run | None:
        raise NotImplementedError

    def report(self, run: Run, value: float) -> bool:
        raise NotImplementedError

    def finish(self, run: Run, value: float, *, pruned: bool) -> None:
        raise NotImplementedError


def _study(seed: int, pruner: Any) -> Any:
    import optuna

    # A fixed name: HyperbandPruner assigns brackets by a hash of the study name and trial number,
    # so an auto-generated (random) name made its figures change from run to run.
    return optuna.create_study(
        study_name=f"bench-seed{seed}",
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=seed),
        pruner=pruner,
    )


class PrunerPolicy(Policy):
    """Optuna's way: every trial trains to the end unless its pruner stops it."""

    def __init__(self, pruner: Any, seed: int, space: dict[str, Any]) -> None:
        self.study, self.space = _study(seed, pruner), space

    def start(self) -> Run | None:
        trial = self.study.ask(self.space)
        return Run(trial, dict(trial.params), 0, EPOCHS)

    def report(self, run: Run, value: float) -> bool:
        run.trial.report(value, run.epoch - 1)
        return not run.trial.should_prune()

    def finish(self, run: Run, value: float, *, pruned: bool) -> None:
        import optuna

        if pruned:
            self.study.tell(run.trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(run.trial, value)


class SchedulerPolicy(Policy):
    """lightstudy's scheduler decides; each job is a new trial with the job's user attrs."""

    def __init__(self, scheduler: Any, seed: int, space: dict[str, Any]) -> None:
        import optuna

        self.study, self.space, self.scheduler = _study(seed, optuna.pruners.NopPruner()), space, scheduler
        self.finished: dict[int, Any] = {}  # number -> TrialView of a finished trial (they do not change)

    def views(self) -> list[Any]:
        from optuna.trial import TrialState

        from lightstudy.scheduler import TrialView

        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [*self.finished.values(), *(TrialView.of(t) for t in running)]

    def start(self) -> Run | None:
        from lightstudy.scheduler import Continue, Exploit, Promote, Sample, attrs

        views = self.views()
        job = self.scheduler.next_job(views)
        if isinstance(job, Sample):
            trial = self.study.ask(self.space)
            for key, value in attrs(job, trial.number).items():
                trial.set_user_attr(key, value)
            return Run(trial, dict(trial.params), 0, job.epochs)
        if isinstance(job, (Promote, Exploit, Continue)):
            number = len(self.study.get_trials(deepcopy=False))
            self.study.enqueue_trial(dict(job.params), user_attrs=attrs(job, number))
            trial = self.study.ask(self.space)
            assert trial.number == number and trial.user_attrs["parent_trial"] == job.parent
            parent = next(v for v in views if v.number == job.parent)
            return Run(trial, dict(trial.params), parent.epochs, job.epochs)
        return None  # Wait or Done

    def report(self, run: Run, value: float) -> bool:
        run.trial.report(value, run.epoch - 1)
        return True

    def finish(self, run: Run, value: float, *, pruned: bool) -> None:
        from lightstudy.scheduler import TrialView

        self.study.tell(run.trial, value)
        self.finished[run.trial.number] = TrialView.of(self.study.get_trials(deepcopy=False)[run.trial.number])


def simulate(policy: Policy, surrogate: Surrogate, budget_s: float, *, resume_startup: bool = True) -> Outcome:
    """Run ``policy`` on ``WORKERS`` workers until the budget or until it has nothing left to run.

    ``resume_startup``: a trial resuming a checkpoint pays the start-up a fresh one does.
    """
    out = Outcome()
    events: list[tuple[float, int, Run]] = []  # (time the run's next epoch ends, tie-break, run)
    idle, seq, best = WORKERS, 0, -math.inf

    def fill(now: float) -> None:
        nonlocal idle, seq
        while idle:
            run = policy.start()
            if run is None:
                return
            idle, seq = idle - 1, seq + 1
            out.trials += 1
            cost = surrogate.curve(run.params)[1]
            # A trial that resumes a checkpoint starts up too: epoch 1's extra time over epoch 2.
            startup = max(0.0, cost[0] - cost[1]) if run.start and resume_startup else 0.0
            heapq.heappush(events, (now + startup + cost[run.start], seq, run))

    fill(0.0)
    now = 0.0
    while events:
        now, _, run = heapq.heappop(events)
        if now > budget_s:
            now = budget_s
            break
        acc, cost = surrogate.curve(run.params)
        run.epoch += 1
        out.epochs += 1
        value = float(acc[run.epoch - 1])
        if value > best:
            best = value
            out.best.append((now, value))
        go_on = policy.report(run, value)
        if go_on and run.epoch < run.end:
            seq += 1
            heapq.heappush(events, (now + cost[run.epoch], seq, run))
            continue
        policy.finish(run, value, pruned=not go_on)
        idle += 1
        fill(now)
    out.ended_s = now
    return out


def policies(
    seed: int, space: dict[str, Any], configs: int, asha_settings: dict[str, Any] | None = None
) -> dict[str, Callable[[], Policy]]:
    import optuna

    from lightstudy.scheduler import make_scheduler
    from lightstudy.study_block import AshaSettings, PbtSettings

    p = optuna.pruners
    asha = AshaSettings(**(asha_settings or ASHA))
    pbt = PbtSettings(**PBT, population=configs)  # type: ignore[arg-type]
    return {
        "none": lambda: PrunerPolicy(p.NopPruner(), seed, space),
        "median": lambda: PrunerPolicy(p.MedianPruner(), seed, space),
        "sha": lambda: PrunerPolicy(p.SuccessiveHalvingPruner(), seed, space),
        "hyperband": lambda: PrunerPolicy(p.HyperbandPruner(min_resource=1, max_resource=EPOCHS), seed, space),
        "asha": lambda: SchedulerPolicy(
            make_scheduler(asha, n_trials=None, direction="maximize", distributions=space), seed, space
        ),
        "pbt": lambda: SchedulerPolicy(
            make_scheduler(pbt, n_trials=None, direction="maximize", distributions=space, seed=seed), seed, space
        ),
    }


def budget(surrogate: Surrogate, space: dict[str, Any], seed: int, configs: int) -> float:
    """Seconds ``WORKERS`` workers take for ``configs`` random configurations of ``EPOCHS`` epochs."""
    import optuna

    study = _study(10_000 + seed, optuna.pruners.NopPruner())
    total = sum(float(surrogate.curve(study.ask(space).params)[1].sum()) for _ in range(configs))
    return total / WORKERS


def run_task(
    task: str,
    seeds: list[int],
    methods: tuple[str, ...],
    configs: int,
    *,
    resume_startup: bool = True,
    asha: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every method on one task for each seed; the figures against MedianPruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # also in a --jobs worker process
    surrogate, space = Surrogate(task), search_space()
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        limit = budget(surrogate, space, seed, configs)
        made = policies(seed, space, configs, asha)
        outcomes = {m: simulate(made[m](), surrogate, limit, resume_startup=resume_startup) for m in methods}
        median = outcomes["median"]
        target = median.best_at(limit)
        base_t = median.time_to(target)
        per_seed.append(
            {
                "seed": seed,
                "budget_s": limit,
                "target": target,
                "median_time_s": base_t,
                "methods": {
                    m: {
                        "time_ratio": o.time_to(target) / base_t,
                        "final_best": o.best_at(limit),
                        "delta_points": o.best_at(limit) - target,
                        "epochs": o.epochs,
                        "epochs_ratio": o.epochs / median.epochs,
                        "trials": o.trials,
                        "ended_s": o.ended_s,
                    }
                    for m, o in outcomes.items()
                },
            }
        )
    summary = {
        m: {key: _median([s["methods"][m][key] for s in per_seed]) for key in per_seed[0]["methods"][m]}
        for m in methods
    }
    return {"task": task, "per_seed": per_seed, "summary": summary}


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _x(v: float) -> str:
    return "never" if math.isinf(v) else f"{v:.2f}x"


def main() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    p = parser("schedulers", __doc__)
    p.add_argument("--tasks", nargs="+", default=None, help="OpenML task ids (default: all 34; --quick: 3)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument(
        "--free-resume",
        action="store_true",
        help="a trial resuming a checkpoint (promotion, exploit) pays no start-up time (default: it does)",
    )
    p.add_argument(
        "--asha-min-resource", type=int, default=ASHA["min_resource"], help="ASHA's rung 0 (default: %(default)s)"
    )
    p.add_argument(
        "--asha-reduction-factor", type=int, default=ASHA["reduction_factor"], help="ASHA's eta (default: %(default)s)"
    )
    p.add_argument(
        "--budget-configs",
        type=int,
        default=None,
        help=f"the budget, in random configurations trained {EPOCHS} epochs (default: {BUDGET_CONFIGS}; --quick: half)",
    )
    p.add_argument("--jobs", type=int, default=1, help="tasks simulated in parallel processes (default: 1)")
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.budget_configs is not None and args.budget_configs < 1:
        p.error(f"--budget-configs must be at least 1, got {args.budget_configs}")
    if args.asha_reduction_factor < 2:
        p.error(f"--asha-reduction-factor must be at least 2, got {args.asha_reduction_factor}")
    if not 1 <= args.asha_min_resource <= EPOCHS:
        p.error(f"--asha-min-resource must be 1 to {EPOCHS} (epochs), got {args.asha_min_resource}")
    asha = {**ASHA, "min_resource": args.asha_min_resource, "reduction_factor": args.asha_reduction_factor}
    methods = tuple(dict.fromkeys(["median", *args.methods]))  # the baseline runs always, first
    chosen = args.tasks or (list(QUICK_TASKS) if args.quick else tasks())
    seeds = list(range(args.reps or (1 if args.quick else SEEDS)))
    configs = args.budget_configs or (BUDGET_CONFIGS // 2 if args.quick else BUDGET_CONFIGS)
    started = time.perf_counter()
    results = []
    startup = not args.free_resume
    run = partial(run_task, seeds=seeds, methods=methods, configs=configs, resume_startup=startup, asha=asha)
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else nullcontext() as pool:
        # Each task is seeded on its own: the same figures whatever --jobs; printed in task order.
        for task, result in zip(chosen, pool.map(run, chosen) if pool else map(run, chosen), strict=True):
            results.append(result)
            s = result["summary"]
            shown = "  ".join(
                f"{m} {_x(s[m]['time_ratio'])} {s[m]['delta_points']:+.2f}" for m in methods if m != "median"
            )
            print(f"task {task}: median best {result['per_seed'][0]['target']:.2f}  {shown}", flush=True)
    rows = []
    for r in results:
        s = r["summary"]
        rows.append(
            [r["task"], f"{_median([x['target'] for x in r['per_seed']]):.2f}"]
            + [_x(s[m]["time_ratio"]) for m in methods if m != "median"]
            + [f"{s[m]['delta_points']:+.2f}" for m in methods if m != "median"]
        )
    others = [m for m in methods if m != "median"]
    table(
        f"schedulers: LCBench surrogate, {len(chosen)} tasks x {len(seeds)} seeds, {WORKERS} workers, "
        f"ASHA {asha['min_resource']}/{asha['reduction_factor']} (min_resource/eta), "
        f"budget {configs} x {EPOCHS} epochs (time to median's best, as a ratio; final best - median's, points)",
        ["task", "median best"] + [f"{m} t" for m in others] + [f"{m} Δbest" for m in others],
        rows,
    )
    medians = {
        m: {key: _median([r["summary"][m][key] for r in results]) for key in results[0]["summary"][m]} for m in methods
    }
    table(
        "medians over tasks",
        ["method", "time to median's best", "final best - median's (points)", "epochs", "epochs vs median", "trials"],
        [
            [
                m,
                _x(v["time_ratio"]),
                f"{v['delta_points']:+.2f}",
                f"{v['epochs']:.0f}",
                f"{v['epochs_ratio']:.2f}x",
                f"{v['trials']:.0f}",
            ]
            for m, v in medians.items()
        ],
    )
    asha = medians.get("asha")
    if asha is not None:
        ok = asha["time_ratio"] <= 0.5 and asha["delta_points"] >= -0.5
        print(
            f"target (ASHA <= 0.5x median's time, best within 0.5 points): {'met' if ok else 'NOT met'} "
            f"({_x(asha['time_ratio'])}, {asha['delta_points']:+.2f} points)"
        )
    print(f"took {time.perf_counter() - started:.0f} s")
    write_jsonl(
        args.out,
        "schedulers",
        [
            {
                "method": m,
                **{f"median_{k}": v for k, v in medians[m].items()},
                "per_task": {r["task"]: r["summary"][m] for r in results},
            }
            for m in methods
        ]
        + [{"method": "runs", "runs": results}],
        quick=args.quick,
        tasks=chosen,
        seeds=seeds,
        workers=WORKERS,
        budget_configs=configs,
        resume_startup=not args.free_resume,
        epochs=EPOCHS,
        asha=asha,
        pbt={**PBT, "population": configs},
    )


if __name__ == "__main__":
    main()
