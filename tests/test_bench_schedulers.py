"""bench/schedulers.py --quick: three LCBench tasks, one seed, every method through the same simulator."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_bench

sys.path.insert(0, str(REPO / "bench"))
import schedulers

METHODS = ["median", "none", "sha", "hyperband", "asha", "pbt"]


@pytest.mark.slow
def test_quick_run_compares_every_method_against_median_on_each_task(tmp_path: Path) -> None:
    out = tmp_path / "schedulers.jsonl"
    done, rows = run_bench("schedulers.py", out, "--jobs", "2", timeout=300)
    assert "medians over tasks" in done.stdout and "target (ASHA" in done.stdout
    assert [r["method"] for r in rows] == [*METHODS, "runs"]
    assert all(r["bench"] == "schedulers" and r["quick"] is True and r["workers"] == 4 for r in rows)
    (runs,) = [r["runs"] for r in rows if r["method"] == "runs"]
    assert [r["task"] for r in runs] == ["3945", "7593", "34539"]
    for run in runs:
        (seed,) = run["per_seed"]
        median = seed["methods"]["median"]
        # The baseline reaches its own final best at its own time, and that is the target.
        assert median["time_ratio"] == 1.0 and median["final_best"] == seed["target"] and median["delta_points"] == 0
        assert 0 < seed["median_time_s"] <= seed["budget_s"]
        for name in METHODS:
            m = seed["methods"][name]
            assert 0.0 < m["final_best"] <= 100.0 and m["epochs"] > 0 and m["trials"] > 0
            assert m["ended_s"] <= seed["budget_s"] + 1e-6
            # Reaching the target within the budget means ending at least as high; never reaching it, lower.
            assert (m["final_best"] >= seed["target"]) == (not math.isinf(m["time_ratio"]))
        # Without a pruner every trial trains all 52 epochs: the fewest trials for the time.
        assert seed["methods"]["none"]["trials"] <= min(seed["methods"][n]["trials"] for n in METHODS)
        # PBT never trains more than population x 52 epochs; ASHA's promotions are trials beyond its configurations.
        assert seed["methods"]["pbt"]["epochs"] <= 8 * 52
    # Tasks run in worker processes give what one process gives: every figure is seeded.
    alone = schedulers.run_task("3945", [0], tuple(METHODS), 8)
    assert json.loads(json.dumps(alone)) == runs[0]
    medians = {r["method"]: r for r in rows if r["method"] != "runs"}
    assert medians["median"]["median_time_ratio"] == 1.0
    assert set(medians["asha"]["per_task"]) == {"3945", "7593", "34539"}


@pytest.mark.slow
def test_every_method_gives_the_same_figures_on_a_rerun() -> None:
    """HyperbandPruner picks a trial's bracket from a hash of the study name: with Optuna's random
    default name the bench's Hyperband figures changed from run to run (task 7593 once 0.69x, once never)."""
    surrogate, space = schedulers.Surrogate("7593"), schedulers.search_space()
    limit = schedulers.budget(surrogate, space, 0, 8)
    for method in ("hyperband", "asha"):
        a, b = (schedulers.simulate(schedulers.policies(0, space, 8)[method](), surrogate, limit) for _ in range(2))
        assert (a.best, a.epochs, a.trials) == (b.best, b.epochs, b.trials), method


def test_bad_asha_settings_exit_2_with_one_line() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "schedulers.py"), "--asha-reduction-factor", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].endswith("--asha-reduction-factor must be at least 2, got 1")
