from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from lightstudy.errors import SpecError
from lightstudy.study_block import AshaSettings, Component, PbtSettings, parse_component, parse_study


def test_defaults_and_single_objective() -> None:
    settings = parse_study("s.yaml", {"name": "x", "metric": "val_acc", "n_trials": 3})
    assert settings.directions == ("maximize",) and settings.metrics == ("val_acc",)
    assert settings.sampler == Component("TPESampler") and settings.pruner == Component("MedianPruner")
    assert settings.checkpoints.keep == 3 and settings.max_retry == 2
    assert not settings.is_multi_objective


def test_component_forms() -> None:
    assert parse_component("s", "study.sampler", "RandomSampler", allow_none=False) == Component("RandomSampler")
    assert parse_component("s", "study.sampler", {"name": "TPESampler", "seed": 1}, allow_none=False) == Component(
        "TPESampler", {"seed": 1}
    )
    assert parse_component(
        "s", "study.pruner", {"class_path": "my.Pruner", "init_args": {"a": 1}}, allow_none=True
    ) == Component("my.Pruner", {"a": 1})
    assert parse_component("s", "study.pruner", None, allow_none=True) == Component("NopPruner")
    with pytest.raises(SpecError, match="must name an Optuna sampler"):
        parse_component("s", "study.sampler", None, allow_none=False)
    with pytest.raises(SpecError, match="not allowed beside class_path"):
        parse_component("s", "study.sampler", {"class_path": "a.B", "seed": 1}, allow_none=False)


@pytest.mark.parametrize(
    ("raw", "key", "rule"),
    [
        ({"direction": "maximize", "directions": ["maximize"]}, "study.directions", "cannot be given with"),
        ({"directions": ["maximize", "minimize"], "metrics": ["a"]}, "study.directions", "one direction per metric"),
        ({"directions": ["maximize"], "metrics": ["a", "a"]}, "study.directions", "one direction per metric"),
        ({"directions": ["maximize", "maximize"], "metrics": ["a", "a"]}, "study.metrics", "must not repeat"),
        ({"direction": "minimize", "metric": "val_f1"}, "study.direction", "higher is better"),
        ({"direction": "maximize", "metric": "train/loss"}, "study.direction", "lower is better"),
        ({"metric": "val_acc", "enqueue": {"a": 1}}, "study.enqueue", "list of parameter sets"),
        ({"metric": "val_acc", "max_retry": -1}, "study.max_retry", ">= 0"),
        ({"metric": "val_acc", "seed": 1.5}, "study.seed", "integer >= 0 or null"),
        ({"metric": "val_acc", "seed": 2**32}, "study.seed", r"at most 2\*\*32 - 1"),
        ({"metric": "val_acc", "heartbeat_interval": 60}, "study.grace_period", "longer than heartbeat_interval"),
        (
            {"metric": "val_acc", "checkpoints": {"endpoint_url": "http://m:9"}},
            "study.checkpoints.endpoint_url",
            "s3://",
        ),
        ({"metric": "val_acc", "sampler": {"class_path": "a.B", "init_args": 3}}, "study.sampler.init_args", "mapping"),
        ({"metric": ["a"]}, "study.metric", "must name a metric"),
        ({"metric": "val_acc", "timeout": True}, "study.timeout", "seconds > 0"),
    ],
)
def test_rules(raw: dict, key: str, rule: str) -> None:
    with pytest.raises(SpecError, match=rule) as info:
        parse_study("s.yaml", {"name": "x", "n_trials": 2, **raw})
    assert f"s.yaml: {key}:" in str(info.value)
    assert "fix:" in str(info.value)


def test_scheduler_settings_replace_the_pruner() -> None:
    asha = parse_study(
        "s.yaml", {"name": "x", "metric": "m", "n_trials": 9, "scheduler": {"name": "ASHA", "max_resource": 12}}
    )
    assert asha.scheduler == AshaSettings(name="ASHA", max_resource=12, min_resource=1, reduction_factor=3)
    assert asha.pruner == Component("NopPruner")  # promotions replace pruning
    # pruner: null (or NopPruner) beside a scheduler says the same thing, so it is accepted.
    for nop in (None, "none", {"name": "NopPruner"}):
        assert parse_study(
            "s", {"name": "x", "metric": "m", "n_trials": 2, "pruner": nop, "scheduler": asha.scheduler.to_dict()}
        )
    # PBT's budget is its population: it needs no n_trials.
    pbt = parse_study(
        "s.yaml", {"name": "x", "metric": "m", "scheduler": {"name": "PBT", "max_resource": 24, "population": 4}}
    )
    assert isinstance(pbt.scheduler, PbtSettings) and pbt.scheduler.population == 4 and pbt.n_trials is None
    assert pbt.scheduler.to_dict() == {
        "name": "PBT",
        "max_resource": 24,
        "population": 4,
        "interval": 2,
        "quantile": 0.25,
        "resample_probability": 0.25,
    }


@pytest.mark.parametrize(
    ("raw", "key", "rule"),
    [
        ({"pruner": "MedianPruner"}, "study.scheduler", "cannot be given with study.pruner"),
        ({"pruner": {"name": "NopPruner", "x": 1}}, "study.scheduler", "cannot be given with study.pruner"),
        ({"scheduler": "ASHA"}, "study.scheduler", "mapping with `name: ASHA`"),
        ({"scheduler": {"name": "Hyperband", "max_resource": 3}}, "study.scheduler.name", "must be ASHA or PBT"),
        ({"scheduler": {"name": "ASHA"}}, "study.scheduler.max_resource", "is required"),
        ({"scheduler": {"name": "ASHA", "max_resource": 0}}, "study.scheduler.max_resource", "epochs >= 1"),
        ({"scheduler": {"name": "ASHA", "max_resource": "9"}}, "study.scheduler.max_resource", "epochs >= 1"),
        (
            {"scheduler": {"name": "ASHA", "max_resource": 4, "min_resource": 5}},
            "study.scheduler.min_resource",
            r"at most max_resource \(4\)",
        ),
        (
            {"scheduler": {"name": "ASHA", "max_resource": 9, "reduction_factor": 1}},
            "study.scheduler.reduction_factor",
            "integer >= 2",
        ),
        (
            {"scheduler": {"name": "ASHA", "max_resource": 9, "population": 4}},
            "study.scheduler.population",
            "not a key of an ASHA scheduler",
        ),
        ({"scheduler": {"name": "PBT", "max_resource": 9, "population": 1}}, "study.scheduler.population", ">= 2"),
        ({"scheduler": {"name": "PBT", "max_resource": 9, "quantile": 0.6}}, "study.scheduler.quantile", "<= 0.5"),
        (
            {"scheduler": {"name": "PBT", "max_resource": 9, "resample_probability": 2}},
            "study.scheduler.resample_probability",
            "from 0 to 1",
        ),
        ({"scheduler": {"name": "PBT", "max_resource": 4, "interval": 5}}, "study.scheduler.interval", "at most"),
        (
            {"n_trials": 3, "scheduler": {"name": "PBT", "max_resource": 4, "population": 4}},
            "study.n_trials",
            r"at least scheduler.population \(4\)",
        ),
        (
            {
                "directions": ["maximize", "minimize"],
                "metrics": ["a", "b"],
                "pruner": None,
                "scheduler": {"name": "ASHA", "max_resource": 4},
            },
            "study.scheduler",
            "one objective",
        ),
    ],
)
def test_scheduler_rules(raw: dict, key: str, rule: str) -> None:
    doc = {"name": "x", "n_trials": 2, "metric": "val_acc", "scheduler": {"name": "ASHA", "max_resource": 9}, **raw}
    if "metrics" in raw:
        del doc["metric"]
    with pytest.raises(SpecError, match=rule) as info:
        parse_study("s.yaml", doc)
    assert f"s.yaml: {key}:" in str(info.value) and "fix:" in str(info.value)
    assert "\n" not in str(info.value)


def test_validate_and_create_accept_a_scheduler(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "studies" / "digits.yaml").read_text())
    doc["study"].update(pruner=None, scheduler={"name": "ASHA", "max_resource": 12}, storage=None)
    doc["study"]["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "asha.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert run_cli("validate", str(path)).returncode == 0
    done = run_cli("create", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    doc["study"]["pruner"] = "MedianPruner"  # still one or the other
    path.write_text(yaml.safe_dump(doc))
    done = run_cli("validate", str(path))
    assert done.returncode == 2 and "cannot be given with study.pruner" in done.stderr, done.stderr
