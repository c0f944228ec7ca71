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


@pytest.mark.parametrize(
    ("change", "key", "rule"),
    [
        # Each of these raised a Python exception (a traceback from `validate`) before.
        (lambda d: d["trainer"].update(strategy={"class_path": 3}), "trainer.strategy", "LightningCLI rejects"),
        (lambda d: d["trainer"].update({3: 1}), "trainer.3", "name of a Trainer argument"),
        (
            lambda d: d["search_space"].update({"trainer.max_epochs.x": {"type": "int", "low": 1, "high": 2}}),
            'search_space["trainer.max_epochs.x"]',
            "runs through trainer.max_epochs, which is a value",
        ),
        (
            lambda d: d["search_space"].update({"data.class_path": {"type": "categorical", "choices": [1, 2]}}),
            'search_space["data.class_path"]',
            "must choose among class paths",
        ),
        # LightningCLI failed on it with "'NoneType' object has no attribute 'keys'".
        (lambda d: d["model"].update(init_args=None), "model.init_args", "must be a mapping of constructor arguments"),
    ],
)
def test_config_shapes_found_by_the_fuzzer_are_refused(change: Any, key: str, rule: str) -> None:
    from lightstudy.lightning_config import check_spec

    doc = tiny_spec()
    change(doc)
    with pytest.raises(SpecError) as info:
        check_spec(spec_from_dict(doc, source="s.yaml"))
    assert str(info.value).startswith(f"s.yaml: {key}: "), info.value
    assert rule in str(info.value) and "fix:" in str(info.value)
