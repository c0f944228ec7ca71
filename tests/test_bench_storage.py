"""bench/storage.py runs end to end (``--quick``) and writes the rows it promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_bench

PHASES = ("claim", "params", "attrs", "reports", "tell", "retention")


@pytest.mark.slow
def test_quick_run_writes_one_row_per_configuration(tmp_path: Path) -> None:
    out = tmp_path / "storage.jsonl"
    # One sampler, one size and one client count keep this short: the full matrix is the same
    # code per value (2 clients: the concurrent path, the barrier and the shared measured trials).
    done, rows = run_bench("storage.py", out, "--samplers", "random", "--sizes", "50", "--clients", "2")
    keys = {(r["backend"], r["sampler"], r["trials"], r["clients"], r["mode"]) for r in rows}
    assert keys == {
        (backend, "random", 50, 2, mode) for backend in ("sqlite", "postgresql") for mode in ("optuna", "lightstudy")
    }
    for row in rows:
        assert row["bench"] == "storage" and row["quick"] is True and row["measured"] >= 6
        assert 0 < row["median_ms"] <= row["p95_ms"]
        assert all(row[f"{phase}_ms"] >= 0 for phase in PHASES)
        assert row["check_ms"] > 0
        assert row["synchronous_commit"] == "on"  # the default
    assert "where a trial's time goes" in done.stdout


@pytest.mark.slow
@pytest.mark.postgres
def test_synchronous_commit_off_is_measured_for_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "storage.jsonl"
    args = ("--backends", "postgresql", "--samplers", "random", "--sizes", "50", "--clients", "1")
    _, rows = run_bench("storage.py", out, *args, "--synchronous-commit", "off")
    assert {(r["synchronous_commit"], r["mode"]) for r in rows} == {("off", "optuna"), ("off", "lightstudy")}
