"""Issue 7's search features end to end: conditional spaces, enqueue and warm starts,
multi-objective studies, every sampler and pruner by name, direction warnings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from conftest import run_cli, tiny_spec, write_spec
from lightstudy.components import build_pruner, build_sampler
from lightstudy.errors import SpecError
from lightstudy.lightning_config import check_spec
from lightstudy.spec import spec_from_dict
from lightstudy.study import create_study, load_study
from lightstudy.summary import recorded_config
from lightstudy.worker import Worker


def _fast(doc: dict[str, Any]) -> dict[str, Any]:
    doc["trainer"].update(max_epochs=2, limit_train_batches=3, limit_val_batches=2)
    return doc


def _conditional(n_trials: int = 6) -> dict[str, Any]:
    doc = _fast(tiny_spec("cond", n_trials=n_trials))
    doc["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}
    doc["search_space"] = {
        "optimizer.class_path": {"type": "categorical", "choices": ["torch.optim.SGD", "torch.optim.AdamW"]},
        "optimizer.init_args.momentum": {
            "type": "float",
            "low": 0.0,
            "high": 0.95,
            "when": {"optimizer.class_path": "torch.optim.SGD"},
        },
        "optimizer.init_args.weight_decay": {
            "type": "float",
            "low": 1e-5,
            "high": 1e-2,
            "log": True,
            "when": {"optimizer.class_path": "torch.optim.AdamW"},
        },
    }
    return doc


def test_conditional_space_validates_every_branch() -> None:
    check_spec(spec_from_dict(_conditional()))
    bad = _conditional()
    bad["search_space"]["optimizer.init_args.momentum"]["when"] = {"optimizer.class_path": "torch.optim.AdamW"}
    with pytest.raises(SpecError, match=r'search_space\["optimizer.init_args.momentum"\]') as info:
        check_spec(spec_from_dict(bad))
    assert "momentum" in str(info.value) and "fix:" in str(info.value)


def test_conditional_study_runs(tmp_path: Path, sqlite_url: str) -> None:
    create_study(spec_from_dict(_conditional()), sqlite_url)
    report = Worker(sqlite_url, "cond", run_dir=tmp_path / "run", threads=1).run()
    assert report.complete == 6
    study, _ = load_study(sqlite_url, "cond")
    for t in study.trials:
        kind = t.params["optimizer.class_path"]
        assert ("optimizer.init_args.momentum" in t.params) == (kind == "torch.optim.SGD")
        optimizer = recorded_config(t)["optimizer"]
        assert optimizer["class_path"] == kind
        if kind == "torch.optim.AdamW":
            assert optimizer["init_args"]["weight_decay"] == t.params["optimizer.init_args.weight_decay"]


def test_enqueued_configurations_are_evaluated_first(tmp_path: Path, sqlite_url: str) -> None:
    queued = [
        {"model.init_args.lr": 0.001, "data.init_args.batch_size": 64},
        {"model.init_args.lr": 0.02, "data.init_args.batch_size": 128},
        {"model.init_args.lr": 0.005},
    ]
    doc = _fast(tiny_spec(n_trials=5, enqueue=queued))
    create_study(spec_from_dict(doc), sqlite_url)
    create_study(spec_from_dict(doc), sqlite_url)  # idempotent: nothing queued twice
    Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1).run()
    study, _ = load_study(sqlite_url, "tiny")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert len(trials) == 5
    for trial, params in zip(trials[:3], queued):
        assert {k: trial.params[k] for k in params} == params
    assert "data.init_args.batch_size" in trials[2].params  # the rest was sampled


def test_enqueue_errors_name_the_value() -> None:
    with pytest.raises(SpecError, match=r"study\.enqueue\[0\]\.model\.init_args\.lr.*outside"):
        spec_from_dict(tiny_spec(enqueue=[{"model.init_args.lr": 5.0}]))
    with pytest.raises(SpecError, match="list of parameter sets"):
        spec_from_dict(tiny_spec(enqueue={"model.init_args.lr": 0.01}))


@pytest.mark.slow
def test_enqueue_command_and_warm_start_from_another_study(tmp_path: Path) -> None:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    # A finished study to start from (its trials recorded directly: how they ran is not under test).
    source = create_study(spec_from_dict(tiny_spec(n_trials=3)), url)
    space = {
        "model.init_args.lr": FloatDistribution(1e-3, 3e-2, log=True),
        "data.init_args.batch_size": CategoricalDistribution([64, 128]),
    }
    for lr, batch_size, value in [(0.002, 64, 0.91), (0.01, 128, 0.95), (0.02, 64, 0.93)]:
        params = {"model.init_args.lr": lr, "data.init_args.batch_size": batch_size}
        source.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=value))
    other = write_spec(tmp_path / "other.yaml", _fast(tiny_spec("other", n_trials=6)))
    run_cli("create", str(other), "--storage", url, check=True)
    out = run_cli(
        "enqueue",
        "other",
        "--storage",
        url,
        "-p",
        "model.init_args.lr=0.004",
        "-p",
        "data.init_args.batch_size=128",
        check=True,
    )
    assert "queued 1 configuration" in out.stdout
    out = run_cli("enqueue", "other", "--storage", url, "--from-study", "tiny", "--top", "2", check=True)
    assert "queued 2 configuration" in out.stdout
    study, _ = load_study(url, "other")
    waiting = [t for t in study.trials if t.state == TrialState.WAITING]
    tiny, _ = load_study(url, "tiny")
    best_two = sorted(tiny.trials, key=lambda t: (-t.value, t.number))[:2]
    assert [t.system_attrs["fixed_params"] for t in waiting[1:]] == [t.params for t in best_two]
    bad = run_cli("enqueue", "other", "--storage", url, "-p", "model.init_args.lr=7")
    assert bad.returncode == 2 and "outside its distribution" in bad.stderr


@pytest.mark.slow
def test_multi_objective_study_shows_and_keeps_the_pareto_front(tmp_path: Path) -> None:
    doc = _fast(tiny_spec("multi", n_trials=6, checkpoints={"keep": 1}))
    del doc["study"]["direction"], doc["study"]["metric"]
    doc["study"].update(
        directions=["maximize", "minimize"],
        metrics=["val_acc", "param_count"],
        sampler={"name": "NSGAIISampler", "population_size": 4},
        pruner=None,
    )
    doc["search_space"]["model.init_args.channels"] = {"type": "int", "low": 4, "high": 32, "step": 4}
    spec = write_spec(tmp_path / "multi.yaml", doc)
    url = f"sqlite:///{tmp_path / 'multi.db'}"
    run_cli("run", str(spec), "--storage", url, cwd=tmp_path, check=True)
    study, _ = load_study(url, "multi")
    front = {t.number for t in study.best_trials}
    best = json.loads(run_cli("best", "multi", "--storage", url, "--format", "json", cwd=tmp_path, check=True).stdout)
    assert {r["number"] for r in best} == front
    assert all(set(r["values"]) == {"val_acc", "param_count"} for r in best)
    assert all(r["checkpoint"] for r in best)  # the whole front is kept
    stored = list((tmp_path / "runs" / "multi" / "artifacts").iterdir())
    assert len(stored) == len(front)
    table = run_cli("best", "multi", "--storage", url, cwd=tmp_path, check=True).stdout
    assert table.count("Pareto-optimal trial") == len(front)


def test_several_objectives_refuse_a_pruner() -> None:
    doc = tiny_spec(pruner="MedianPruner")
    del doc["study"]["direction"], doc["study"]["metric"]
    doc["study"].update(directions=["maximize", "minimize"], metrics=["val_acc", "param_count"])
    with pytest.raises(SpecError, match="cannot prune a study with several objectives"):
        spec_from_dict(doc)


SAMPLERS = [
    {"name": "TPESampler", "multivariate": True, "group": True},
    {"name": "GPSampler", "n_startup_trials": 2},
    {"name": "CmaEsSampler", "n_startup_trials": 1},
    {"name": "NSGAIISampler", "population_size": 4},
    {"name": "QMCSampler", "qmc_type": "sobol", "scramble": True},
    {"name": "RandomSampler"},
]
PRUNERS = [
    {"name": "MedianPruner", "n_warmup_steps": 1},
    {"name": "PercentilePruner", "percentile": 25.0},
    {"name": "SuccessiveHalvingPruner", "min_resource": 1},
    {"name": "HyperbandPruner", "min_resource": 1, "max_resource": 3},
    {"name": "WilcoxonPruner", "p_threshold": 0.1},
    {"name": "PatientPruner", "wrapped_pruner": {"name": "MedianPruner"}, "patience": 1},
    {"name": "ThresholdPruner", "lower": 0.1},
]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=[s["name"] for s in SAMPLERS])
def test_every_sampler_by_name_drives_a_study(sampler: dict[str, Any]) -> None:
    spec = spec_from_dict(tiny_spec(sampler=sampler))
    study = optuna.create_study(direction="maximize")
    from lightstudy.search_space import suggest_params

    for i in range(4):
        study.sampler = build_sampler(spec, seed_offset=i)
        trial = study.ask()
        values = suggest_params(trial, spec.search_space)
        study.tell(trial, values["model.init_args.lr"])
    assert len(study.trials) == 4


@pytest.mark.parametrize("pruner", PRUNERS, ids=[p["name"] for p in PRUNERS])
def test_every_pruner_by_name_decides(pruner: dict[str, Any]) -> None:
    spec = spec_from_dict(tiny_spec(pruner=pruner))
    study = optuna.create_study(direction="maximize", pruner=build_pruner(spec))
    for value in (0.9, 0.8, 0.1):
        trial = study.ask()
        for step in range(3):
            trial.report(value, step)
            trial.should_prune()
        study.tell(trial, value)
    assert len(study.trials) == 3


def test_grid_sampler_over_a_discrete_space() -> None:
    doc = tiny_spec(sampler="GridSampler")
    doc["search_space"] = {"data.init_args.batch_size": {"type": "categorical", "choices": [32, 64]}}
    assert isinstance(build_sampler(spec_from_dict(doc)), optuna.samplers.GridSampler)


def test_direction_against_higher_is_better_is_reported(tmp_path: Path, sqlite_url: str) -> None:
    doc = _fast(tiny_spec(n_trials=1, direction="minimize", metric="val_score"))
    doc["model"]["class_path"] = "lightstudy_testing_models.ScoreNet"
    create_study(spec_from_dict(doc), sqlite_url)
    Worker(sqlite_url, "tiny", run_dir=tmp_path / "run", threads=1).run()
    study, _ = load_study(sqlite_url, "tiny")
    [warning] = study.trials[0].user_attrs["warnings"]
    assert "higher_is_better=True" in warning and "maximize" in warning


@pytest.mark.slow
def test_a_grid_study_runs_every_point_once_with_several_workers(tmp_path: Path) -> None:
    """`lightstudy run --workers 1` on a 12-point grid exited 2 (study.stop() raised in tell)."""
    doc = _fast(tiny_spec("grid", n_trials=30, sampler="GridSampler"))
    doc["trainer"].update(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    doc["search_space"] = {  # 4 x 3 = 12 points
        "data.init_args.batch_size": {"type": "categorical", "choices": [16, 32, 64, 128]},
        "model.init_args.lr": {"type": "categorical", "choices": [0.001, 0.01, 0.03]},
    }
    path = write_spec(tmp_path / "grid.yaml", doc)
    done = run_cli("run", str(path), "--workers", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    study, _ = load_study(f"sqlite:///{tmp_path / 'runs' / 'grid' / 'study.db'}", "grid")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 12
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 12
