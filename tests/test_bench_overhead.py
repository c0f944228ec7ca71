"""bench/overhead.py --quick runs end to end and writes one row per method, without errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_bench

METHODS = {"plain", "lean", "optuna", "fresh", "lightstudy"}


@pytest.mark.slow
def test_quick_overhead_writes_every_method(tmp_path: Path) -> None:
    out = tmp_path / "overhead.jsonl"
    # One measured trial per method (after its warm-up trial): every method, row and column, with
    # the fewest processes (a fresh interpreter costs seconds a trial, as does lightstudy's start).
    _, rows = run_bench("overhead.py", out, "--reps", "1")
    measured = [r for r in rows if r["method"] in METHODS]
    assert {r["method"] for r in measured} == METHODS
    for r in measured:
        assert r["bench"] == "overhead" and r["workload"] == "trivial"
        assert r["errors"] == 0, r
        assert r["trials"] == r["per_trial_s"]["n"] == 1
        assert 0 < r["per_trial_s"]["min"] <= r["per_trial_s"]["median"] <= r["per_trial_s"]["max"]
        assert r["ratio_vs_optuna"] > 0
    # the same trials: lightstudy and the in-process loop train the same learning rates and seeds
    by = {r["method"]: r for r in measured}
    assert by["optuna"]["values"] == by["fresh"]["values"]
    breakdown = next(r for r in rows if r["method"] == "lightstudy breakdown")
    assert {"claim", "start", "setup", "fit", "checkpoint", "other"} <= set(breakdown["parts_s"])
    assert breakdown["start_s"] > 0
    assert any(r["method"] == "target" for r in rows)
    # what a user waits for: lightstudy run and the in-process loop script, command to exit
    whole = next(r for r in rows if r["method"] == "whole process")
    assert whole["lightstudy_s"] > 0 and whole["script_s"] > 0
    assert whole["ratio"] == pytest.approx(whole["lightstudy_s"] / whole["script_s"])
