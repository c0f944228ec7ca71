from __future__ import annotations

from typing import Any

import pytest

from conftest import tiny_spec
from lightstudy.config_rules import trial_world_size
from lightstudy.errors import SpecError
from lightstudy.spec import spec_from_dict


def _ddp(n_trials: int) -> dict[str, Any]:
    doc = tiny_spec("ddp", n_trials=n_trials)
    doc["trainer"].update(accelerator="cpu", devices=2, strategy="ddp")
    return doc


def test_world_size_comes_from_the_trainer() -> None:
    assert trial_world_size(_ddp(1)) == 2
    assert trial_world_size(tiny_spec()) == 1
    doc = _ddp(1)
    doc["trainer"]["strategy"] = "ddp_spawn"
    with pytest.raises(SpecError, match="launches its own processes"):
        spec_from_dict(doc)
    doc["trainer"].update(strategy="ddp", devices="auto")
    with pytest.raises(SpecError, match=r"trainer\.devices"):
        spec_from_dict(doc)


def test_several_nodes_are_refused() -> None:
    doc = _ddp(1)
    doc["trainer"]["num_nodes"] = 2
    with pytest.raises(SpecError, match=r"trainer\.num_nodes"):
        spec_from_dict(doc)
    assert trial_world_size({"trainer": {"devices": [0, 1, 2]}}) == 3
