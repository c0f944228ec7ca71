from __future__ import annotations

import optuna
import pytest

from conftest import tiny_spec
from lightstudy.components import build_pruner, build_sampler
from lightstudy.errors import SpecError
from lightstudy.spec import spec_from_dict


def _spec(**study: object):
    return spec_from_dict(tiny_spec(**study))


def test_sampler_and_pruner_by_name_with_kwargs() -> None:
    spec = _spec(
        sampler={"name": "TPESampler", "n_startup_trials": 3},
        pruner={"name": "HyperbandPruner", "min_resource": 1},
    )
    sampler = build_sampler(spec)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert isinstance(build_pruner(spec), optuna.pruners.HyperbandPruner)


def test_class_path_form_and_none_pruner() -> None:
    spec = _spec(sampler={"class_path": "optuna.samplers.RandomSampler", "init_args": {"seed": 3}}, pruner="none")
    assert isinstance(build_sampler(spec), optuna.samplers.RandomSampler)
    assert isinstance(build_pruner(spec), optuna.pruners.NopPruner)


def test_reseeding_gives_each_claim_its_own_stream() -> None:
    spec = _spec(sampler={"name": "RandomSampler"})
    draws = []
    for offset in (0, 1, 0):
        study = optuna.create_study(sampler=build_sampler(spec, seed_offset=offset))
        draws.append(study.ask().suggest_float("x", 0, 1))
    assert draws[0] == draws[2] != draws[1]


def test_grid_sampler_gets_the_grid_from_the_search_space() -> None:
    doc = tiny_spec(sampler="GridSampler")
    doc["search_space"] = {
        "model.init_args.channels": {"type": "int", "low": 8, "high": 16, "step": 8},
        "data.init_args.batch_size": {"type": "categorical", "choices": [32, 64]},
    }
    sampler = build_sampler(spec_from_dict(doc))
    assert isinstance(sampler, optuna.samplers.GridSampler)
    doc["search_space"]["model.init_args.lr"] = {"type": "float", "low": 0.1, "high": 0.2}
    with pytest.raises(SpecError, match="finite grid"):
        build_sampler(spec_from_dict(doc))


@pytest.mark.parametrize(
    ("study", "match"),
    [
        ({"sampler": "NoSampler"}, "is not an optuna.samplers class"),
        ({"sampler": {"class_path": "nowhere.Sampler"}}, "does not import"),
        ({"sampler": {"class_path": "optuna.pruners.MedianPruner"}}, "subclass of optuna.samplers"),
        ({"pruner": {"name": "MedianPruner", "warmup": 3}}, "MedianPruner does not accept"),
        ({"pruner": {"name": "PercentilePruner", "percentile": 200.0}}, "PercentilePruner rejected its arguments"),
    ],
)
def test_errors_name_the_component(study: dict, match: str) -> None:
    spec = _spec(**study)
    with pytest.raises(SpecError, match=match) as info:
        build_sampler(spec)
        build_pruner(spec)
    assert "fix:" in str(info.value)
    assert "Cached" not in str(info.value), "errors name the class the spec names, not lightstudy's stand-in"
