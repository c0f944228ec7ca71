from __future__ import annotations

import pytest

from lightstudy.errors import LightstudyError
from lightstudy.launcher import Slot, detect_gpus, plan_slots


def test_one_worker_per_gpu_pinned() -> None:
    slots = plan_slots("0,1,2,3", None, cpu_count=16)
    assert [s.gpu for s in slots] == ["0", "1", "2", "3"]
    env = slots[2].env({"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert env["OMP_NUM_THREADS"] == "4"


def test_trials_per_gpu_packs_workers_on_each_gpu() -> None:
    slots = plan_slots("0,1", None, trials_per_gpu=2, cpu_count=8)
    assert [s.gpu for s in slots] == ["0", "0", "1", "1"]
    assert all(s.threads == 2 for s in slots)


def test_auto_uses_detected_gpus_or_falls_back_to_cpu() -> None:
    assert [s.gpu for s in plan_slots("auto", None, detected=["0", "1"], cpu_count=4)] == ["0", "1"]
    assert [s.gpu for s in plan_slots(None, None, detected=["5"], cpu_count=4)] == ["5"]
    assert plan_slots("auto", None, detected=[], cpu_count=4) == [Slot(0, None, 4)]


def test_cpu_workers_split_threads_and_hide_gpus() -> None:
    slots = plan_slots(None, 2, cpu_count=2, detected=["0"])
    assert [(s.gpu, s.threads) for s in slots] == [(None, 1), (None, 1)]
    assert slots[0].env({})["CUDA_VISIBLE_DEVICES"] == ""
    assert [s.threads for s in plan_slots(None, 4, cpu_count=2)] == [1, 1, 1, 1]


@pytest.mark.parametrize("gpus", ["a,b", "0,0", "1;2"])
def test_malformed_gpus_are_refused(gpus: str) -> None:
    with pytest.raises(LightstudyError, match="--gpus"):
        plan_slots(gpus, None)


def test_counts_must_be_positive() -> None:
    with pytest.raises(LightstudyError, match="--workers"):
        plan_slots(None, 0)
    with pytest.raises(LightstudyError, match="--trials-per-gpu"):
        plan_slots("0", None, trials_per_gpu=0)


def test_detect_respects_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert detect_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []
