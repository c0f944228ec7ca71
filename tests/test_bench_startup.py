"""bench/startup.py --quick times the whole-process comparisons and checks what each side ran.

The suite runs two of the three (the third, 4 workers against 1, runs the same `lightstudy run`
path as the others and costs a minute here); `python bench/startup.py --quick` runs all three."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_bench


@pytest.mark.slow
def test_quick_startup_times_every_comparison(tmp_path: Path) -> None:
    _, rows = run_bench("startup.py", tmp_path / "startup.jsonl", "--only", "loop", "--only", "first")
    assert [r["comparison"] for r in rows] == ["loop", "first"]
    for r in rows:
        assert r["bench"] == "startup" and r["quick"] is True
        assert r["ours_s"]["n"] == r["base_s"]["n"] == 1
        assert r["ours_s"]["median"] > 0 and r["base_s"]["median"] > 0
        assert r["ratio"] == pytest.approx(r["ours_s"]["median"] / r["base_s"]["median"])
        assert r["met"] == (r["ratio"] <= r["target"])
