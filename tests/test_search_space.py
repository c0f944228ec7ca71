from __future__ import annotations

import optuna
import pytest

from lightstudy.errors import SpecError
from lightstudy.search_space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    apply_params,
    parse_search_space,
    suggest_params,
)


def test_parses_each_distribution() -> None:
    params = parse_search_space(
        "s.yaml",
        {
            "model.init_args.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
            "model.init_args.dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
            "model.init_args.channels": {"type": "int", "low": 8, "high": 64, "step": 8},
            "data.init_args.batch_size": {"type": "categorical", "choices": [32, 64]},
        },
    )
    assert params == (
        FloatParam("model.init_args.lr", 1e-4, 0.1, log=True),
        FloatParam("model.init_args.dropout", 0.0, 0.5, step=0.1),
        IntParam("model.init_args.channels", 8, 64, step=8),
        CategoricalParam("data.init_args.batch_size", (32, 64)),
    )
    for p in params:
        assert p.distribution() is not None
        assert parse_search_space("s.yaml", {p.path: p.to_dict()}) == (p,)


@pytest.mark.parametrize(
    ("raw", "key", "rule"),
    [
        ({"type": "float", "low": 1, "high": 0}, "", "low <= high"),
        ({"type": "float", "low": 0, "high": 1, "log": True}, ".low", "> 0 when log"),
        ({"type": "float", "low": "a", "high": 1}, ".low", "finite number"),
        ({"type": "float", "high": 1}, ".low", "required"),
        ({"type": "float", "low": 0, "high": 1, "step": -1}, ".step", "> 0"),
        ({"type": "int", "low": 1.5, "high": 4}, ".low", "integer"),
        ({"type": "int", "low": 0, "high": 4, "log": True}, ".low", ">= 1 when log"),
        ({"type": "int", "low": 1, "high": 4, "log": True, "step": 2}, "", "`step` must be 1"),
        ({"type": "int", "low": 1, "high": 4, "step": 0}, ".step", "must be > 0"),
        ({"type": "int", "low": 1, "high": 4, "step": 1.5}, ".step", "integer"),
        ({"type": "float", "low": 1e-3, "high": 1, "log": True, "step": 0.1}, "", "`step` and `log` cannot"),
        ({"type": "float", "low": 0, "high": float("nan")}, ".high", "finite number"),
        ({"type": "float", "low": 0, "high": 1, "log": "yes"}, ".log", "true or false"),
        ({"type": "int", "low": True, "high": 4}, ".low", "integer"),
        ({"type": "categorical", "choices": "abc"}, ".choices", "non-empty list"),
        ({"type": "categorical", "choices": []}, ".choices", "non-empty list"),
        ({"type": "float", "low": 0, "high": 1, "path": "x"}, ".path", "not a key"),
        # Found by tests/test_spec_fuzz.py: these raised TypeError and decimal.InvalidOperation.
        ({"type": [], "low": 0, "high": 1}, ".type", "one of float"),
        ({"type": "float", "low": 0, "high": 1, "step": 1e-300}, ".step", "too small for the range"),
        ({"type": "categorical", "choices": [1, 1]}, ".choices", "repeat"),
        ({"type": "categorical", "choices": [[1]]}, ".choices", "null, a bool"),
        ({"type": "categorical"}, ".choices", "non-empty list"),
        ({"type": "uniform", "low": 0, "high": 1}, ".type", "one of float"),
        ({"low": 0, "high": 1}, ".type", "one of float"),
        ({"type": "float", "low": 0, "high": 1, "logg": True}, ".logg", "not a key"),
        ("0.1", "", "distribution mapping"),
    ],
)
def test_rules_name_key_rule_and_value(raw: object, key: str, rule: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_search_space("s.yaml", {"model.init_args.x": raw})
    message = str(info.value)
    assert message.startswith(f's.yaml: search_space["model.init_args.x"]{key}:'), message
    assert rule in message
    assert "fix:" in message


def test_optuna_decides_and_its_words_survive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounds are Optuna's to judge: a refusal lightstudy has no wording for keeps Optuna's."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("`high` must be lucky, but got high=1.")

    monkeypatch.setattr(optuna.distributions.FloatDistribution, "__init__", refuse)
    with pytest.raises(SpecError) as info:
        parse_search_space("s.yaml", {"model.init_args.x": {"type": "float", "low": 0, "high": 1}})
    message = str(info.value)
    assert message.startswith('s.yaml: search_space["model.init_args.x"]: Optuna refuses it (`high` must be lucky')
    assert "fix:" in message


def test_bad_paths_and_shapes() -> None:
    with pytest.raises(SpecError, match="mapping of dotted config paths"):
        parse_search_space("s.yaml", [1, 2])
    with pytest.raises(SpecError, match="dotted config paths"):
        parse_search_space("s.yaml", {"model..lr": {"type": "float", "low": 0, "high": 1}})
    assert parse_search_space("s.yaml", None) == ()


def test_suggest_uses_the_path_as_name_and_respects_bounds() -> None:
    params = parse_search_space(
        "s.yaml",
        {
            "model.init_args.lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
            "model.init_args.channels": {"type": "int", "low": 8, "high": 64, "step": 8},
            "data.init_args.batch_size": {"type": "categorical", "choices": [32, 64]},
        },
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        values = suggest_params(study.ask(), params)
        assert 1e-4 <= values["model.init_args.lr"] <= 0.1
        assert values["model.init_args.channels"] % 8 == 0
        assert values["data.init_args.batch_size"] in (32, 64)


def test_fixed_params_of_an_enqueued_trial_come_back() -> None:
    params = parse_search_space("s.yaml", {"model.init_args.lr": {"type": "float", "low": 0.1, "high": 1.0}})
    study = optuna.create_study()
    study.enqueue_trial({"model.init_args.lr": 0.5})
    assert suggest_params(study.ask(), params) == {"model.init_args.lr": 0.5}


def test_apply_params_sets_dotted_paths_on_a_copy() -> None:
    config = {"model": {"class_path": "x.Y"}, "trainer": {"callbacks": [{"init_args": {"patience": 1}}]}}
    out = apply_params(
        config,
        {"model.init_args.lr": 0.1, "trainer.callbacks.0.init_args.patience": 5, "trainer.max_epochs": 3},
    )
    assert out["model"]["init_args"] == {"lr": 0.1}
    assert out["trainer"]["callbacks"][0]["init_args"]["patience"] == 5
    assert out["trainer"]["max_epochs"] == 3
    assert config == {
        "model": {"class_path": "x.Y"},
        "trainer": {"callbacks": [{"init_args": {"patience": 1}}]},
    }
    with pytest.raises(KeyError):
        apply_params({"model": "Adam"}, {"model.init_args.lr": 1})
