"""bench/startup.py --quick times a whole-process comparison and checks what each side ran.

The suite runs one of the three: `loop`, `lightstudy run` against the in-process loop script,
which runs every function of the script (`lightstudy_run`, `in_process_loop`, `timed`). The
other two are the same `lightstudy run` path against a `python -c` import (`first`) or itself
(`workers`) and cost half a minute or a minute more here; `python bench/startup.py --quick` runs
all three."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_bench


@pytest.mark.slow
def test_quick_startup_times_every_comparison(tmp_path: Path) -> None:
    _, rows = run_bench("startup.py", tmp_path / "startup.jsonl", "--only", "loop")
    assert [r["comparison"] for r in rows] == ["loop"]
    for r in rows:
        assert r["bench"] == "startup" and r["quick"] is True
        assert r["ours_s"]["n"] == r["base_s"]["n"] == 1
        assert r["ours_s"]["median"] > 0 and r["base_s"]["median"] > 0
        assert r["ratio"] == pytest.approx(r["ours_s"]["median"] / r["base_s"]["median"])
        assert r["met"] == (r["ratio"] <= r["target"])
