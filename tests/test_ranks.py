from __future__ import annotations

from typing import Any

import pytest

from conftest import tiny_spec
from lightstudy.devices import check_ddp_storage, check_devices
from lightstudy.errors import LightstudyError
from lightstudy.ranks import exit_reason
from lightstudy.spec import spec_from_dict


def _ddp(n_trials: int) -> dict[str, Any]:
    doc = tiny_spec("ddp", n_trials=n_trials)
    doc["trainer"].update(accelerator="cpu", devices=2, strategy="ddp")
    return doc


def test_too_few_gpus_or_a_proxy_storage_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _ddp(1)
    doc["trainer"]["accelerator"] = "gpu"
    spec = spec_from_dict(doc)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(LightstudyError, match="runs on 2 GPUs, but this worker sees 1"):
        check_devices(spec, 2, "sqlite:///x.db")
    with pytest.raises(LightstudyError, match="needs a database storage"):
        check_devices(spec_from_dict(_ddp(1)), 2, "grpc://127.0.0.1:13000")


def test_one_device_needs_no_check() -> None:
    check_ddp_storage(1, "grpc://127.0.0.1:1")
    check_devices(spec_from_dict(tiny_spec()), 1, "grpc://127.0.0.1:1")


def test_exit_reasons_say_what_happened() -> None:
    assert "killed by SIGKILL" in exit_reason(-9) and "out of memory" in exit_reason(-9)
    assert "exited with code 1" in exit_reason(1)
    assert "did not exit" in exit_reason(None)
