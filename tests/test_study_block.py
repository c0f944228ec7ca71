from __future__ import annotations

import pytest

from lightstudy.errors import SpecError
from lightstudy.study_block import Component, parse_component, parse_study


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
