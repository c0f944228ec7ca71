from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import Finished, run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow(seconds=8)  # once finished_study is built
def test_report_renders_in_headless_chromium_with_every_plot(finished_study: Finished, tmp_path: Path) -> None:
    assert CHROMIUM, "Chromium is needed for this test: apt-get install chromium (.ci/run does)"
    from playwright.sync_api import sync_playwright

    out = tmp_path / "report.html"
    run_cli(
        "report",
        finished_study.name,
        "--storage",
        finished_study.url,
        "--run-dir",
        str(finished_study.run_dir),
        "--out",
        str(out),
        check=True,
    )
    text = out.read_text()
    assert "<script" in text and "<script src=" not in text  # plotly.js inlined: opens offline
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(out.as_uri())
        page.wait_for_selector(".plotly-graph-div .main-svg", timeout=60_000)
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        titles = page.locator("section.plot h2").all_inner_texts()
        plots = page.locator("section.plot .plotly-graph-div").count()
        rendered = page.locator("section.plot .plotly-graph-div .main-svg").count()
        kept_rows = page.locator("table tbody tr").count()
        browser.close()
    assert errors == []
    assert titles == [
        "Optimization history",
        "Intermediate values",
        "Parameter importances",
        "Parallel coordinates",
        "Slice",
    ]
    assert plots == 5 and rendered >= 5
    assert kept_rows == 2
    assert (tmp_path / "report.png").stat().st_size > 10_000
