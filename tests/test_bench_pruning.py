"""bench/pruning.py --quick --trials 2: one seed, two 2-epoch trials (one per worker) without pruning
and with Median, through `lightstudy run`."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_bench

TRIALS = 2  # --quick's 4 less: one trial per worker, each with every column the report has


@pytest.mark.slow
def test_quick_run_writes_one_row_per_pruner_and_checks_every_spec(tmp_path: Path) -> None:
    out = tmp_path / "pruning.jsonl"
    done, rows = run_bench("pruning.py", out, "--trials", str(TRIALS), timeout=300)
    assert "pruning: digits" in done.stdout and f"wrote 2 rows to {out}" in done.stdout
    assert [r["pruner"] for r in rows] == ["none", "median"]
    # The full run's specs (every pruner, with its kwargs) passed lightstudy's checks.
    assert rows[0]["checked_specs"] == ["study/none", "study/median", "study/sha", "study/hyperband"]
    for row in rows:
        assert row["bench"] == "pruning" and row["quick"] is True
        assert row["trials"] == TRIALS and row["epochs"] == 2 and len(row["seeds"]) == 1
        (seed,) = row["per_seed"]
        # Every trial of the budget finished, each trained 1..epochs epochs, counted from its reports.
        assert len(seed["epochs_per_trial"]) == seed["complete"] + seed["pruned"] == TRIALS
        assert all(1 <= e <= 2 for e in seed["epochs_per_trial"])
        assert seed["epochs_total"] == sum(seed["epochs_per_trial"])
        assert 0.0 < seed["final_best"] <= 1.0
        assert sorted(seed["to_target"]) == sorted(str(g) for g in row["targets"])
        for hit in seed["to_target"].values():
            if hit is not None:
                assert 1 <= hit["trials"] <= TRIALS and hit["epochs"] <= seed["epochs_total"]
                assert 0 < hit["seconds"] <= seed["seconds_total"]
        # The final best of no pruning, reached by no pruning itself at the trial that found it.
        assert row["to_none_best"]["reached"] in (0, 1)
        assert seed["final_best"] == max(v for v in seed["values"] if v is not None)
        assert seed["ends_s"] == sorted(seed["ends_s"]) and seed["seconds_total"] == seed["ends_s"][-1]
        assert row["final_best"]["n"] == 1 and "machine" in row
    # The baseline trains every trial to the end; the ratios are against it.
    assert rows[0]["per_seed"][0]["epochs_per_trial"] == [2] * TRIALS
    assert rows[0]["per_seed"][0]["pruned"] == 0
    assert rows[0]["to_none_best"]["reached"] == 1 and rows[0]["to_none_best"]["epochs_ratio_vs_none"]["median"] == 1.0
    assert rows[0]["epochs_total_ratio_vs_none"]["median"] == 1.0
    assert rows[0]["final_best_delta_points"]["median"] == 0.0
