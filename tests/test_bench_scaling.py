"""bench/scaling.py --quick runs 1 and 2 workers on SQLite, both ways, and finds nothing wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_bench


@pytest.mark.slow
def test_quick_scaling_rows_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "scaling.jsonl"
    # SQLite only: bench/storage.py's test runs the benchmarks' PostgreSQL path; a second
    # backend here would double the test's time for nothing new to the script.
    # Two trials a run: with 2 workers the steady part, the storage share and the checks are the
    # same code as with more (the full run's 40 trials only make the figures steadier).
    _, rows = run_bench("scaling.py", out, "--backends", "sqlite", "--trials", "2")
    runs = [r for r in rows if "workers" in r]
    assert {(r["backend"], r["via"], r["workers"]) for r in runs} == {
        ("sqlite", via, n) for via in ("run", "worker") for n in (1, 2)
    }
    for r in runs:
        assert r["bench"] == "scaling"
        assert r["errors"] == 0, r
        assert r["complete"] == r["trials"] == 2
        assert r["running_at_end"] == r["duplicate_numbers"] == r["lost"] == r["storage_errors"] == 0
        assert r["wall_s"]["median"] > r["startup_s"]["median"] > 0
        assert r["trials_per_hour"] > 0 and r["efficiency"] > 0
        assert 0 < r["storage_share"] < 1  # the workers' storage time over their steady time
    targets = [r for r in rows if r.get("target", "").startswith("efficiency")]
    assert sorted(r["via"] for r in targets) == ["run", "worker"]  # one per backend and way
