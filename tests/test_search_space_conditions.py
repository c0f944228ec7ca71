"""Conditional search spaces (``when:``) and fixed parameter sets (enqueue)."""

from __future__ import annotations

import optuna
import pytest

from lightstudy.errors import SpecError
from lightstudy.search_space import assignment, check_fixed_params, parse_search_space, suggest_params

SPACE = {
    "optimizer.class_path": {"type": "categorical", "choices": ["torch.optim.SGD", "torch.optim.AdamW"]},
    "optimizer.init_args.momentum": {
        "type": "float",
        "low": 0.0,
        "high": 0.99,
        "when": {"optimizer.class_path": "torch.optim.SGD"},
    },
    "optimizer.init_args.weight_decay": {
        "type": "float",
        "low": 1e-6,
        "high": 1e-2,
        "log": True,
        "when": {"optimizer.class_path": ["torch.optim.AdamW"]},
    },
    "optimizer.init_args.nesterov": {
        "type": "categorical",
        "choices": [True, False],
        "when": {"optimizer.init_args.momentum": 0.9, "optimizer.class_path": "torch.optim.SGD"},
    },
}


def test_conditions_parse_and_round_trip() -> None:
    params = parse_search_space("s.yaml", SPACE)
    assert params[1].when == (("optimizer.class_path", ("torch.optim.SGD",)),)
    again = parse_search_space("s.yaml", {p.path: p.to_dict() for p in params})
    assert again == params


def test_only_active_parameters_are_sampled() -> None:
    params = parse_search_space("s.yaml", SPACE)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        values = suggest_params(study.ask(), params)
        kind = values["optimizer.class_path"]
        seen.add(kind)
        assert ("optimizer.init_args.momentum" in values) == (kind == "torch.optim.SGD")
        assert ("optimizer.init_args.weight_decay" in values) == (kind == "torch.optim.AdamW")
    assert seen == {"torch.optim.SGD", "torch.optim.AdamW"}


def test_assignment_switches_on_what_it_overrides() -> None:
    params = parse_search_space("s.yaml", SPACE)
    values = assignment(params, {"optimizer.init_args.weight_decay": 0.01})
    assert values == {"optimizer.class_path": "torch.optim.AdamW", "optimizer.init_args.weight_decay": 0.01}
    nested = assignment(params, {"optimizer.init_args.nesterov": True})
    assert nested["optimizer.class_path"] == "torch.optim.SGD"
    assert nested["optimizer.init_args.momentum"] == 0.9


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ({"optimizer.init_args.lr": 0.1}, "not a parameter listed before"),
        ({"optimizer.class_path": "torch.optim.Adam"}, "can never take"),
        ("SGD", "must map earlier parameters"),
        ({"optimizer.class_path": []}, "needs at least one value"),
    ],
)
def test_invalid_conditions_are_clear_errors(when: object, message: str) -> None:
    space = dict(SPACE)
    space["optimizer.init_args.dampening"] = {"type": "float", "low": 0.0, "high": 0.5, "when": when}
    with pytest.raises(SpecError, match=message) as info:
        parse_search_space("s.yaml", space)
    assert 'search_space["optimizer.init_args.dampening"].when' in str(info.value)
    assert "fix:" in str(info.value)


def test_a_condition_on_a_later_parameter_is_refused() -> None:
    space = {
        "b": {"type": "float", "low": 0, "high": 1, "when": {"a": "x"}},
        "a": {"type": "categorical", "choices": ["x", "y"]},
    }
    space = {
        f"model.init_args.{k}": dict(v, when={f"model.init_args.{p}": w for p, w in v["when"].items()})
        if "when" in v
        else v
        for k, v in space.items()
    }
    with pytest.raises(SpecError, match="not a parameter listed before"):
        parse_search_space("s.yaml", space)


def test_fixed_params_are_checked_against_the_space() -> None:
    params = parse_search_space("s.yaml", SPACE)
    check_fixed_params(
        "s.yaml", "enqueue[0]", params, {"optimizer.class_path": "torch.optim.SGD", "optimizer.init_args.momentum": 0.5}
    )
    with pytest.raises(SpecError, match="not a search-space parameter"):
        check_fixed_params("s.yaml", "enqueue[0]", params, {"model.init_args.lr": 0.1})
    with pytest.raises(SpecError, match="outside its distribution"):
        check_fixed_params("s.yaml", "enqueue[0]", params, {"optimizer.init_args.momentum": 2.0})
    with pytest.raises(SpecError, match="switched off"):
        check_fixed_params(
            "s.yaml",
            "enqueue[0]",
            params,
            {"optimizer.class_path": "torch.optim.AdamW", "optimizer.init_args.momentum": 0.5},
        )
