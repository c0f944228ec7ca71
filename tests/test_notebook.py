"""The Python API in a real Jupyter kernel (ipykernel, run by nbclient as Jupyter runs a notebook)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, tiny_spec, write_spec

WIDGET = "application/vnd.jupyter.widget-view+json"


def _run_notebook(folder: Path, cells: list[str]) -> list[list[dict]]:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code) for code in cells]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return [[dict(o) for o in cell.outputs] for cell in nb.cells]


@pytest.mark.slow(seconds=35)
def test_a_notebook_shows_a_live_bar_and_a_line_per_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lightstudy.run`` in a kernel: rich's live bar as an ipywidgets Output, one line per trial,
    the result object in the next cell; no Optuna INFO line or warning in the cell's output."""
    # The kernel is a new process: it imports this checkout's lightstudy, as the suite does.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    doc = tiny_spec("nbk", n_trials=2, max_epochs=1)
    doc["trainer"].update(limit_train_batches=2, limit_val_batches=1)
    write_spec(tmp_path / "nbk.yaml", doc)

    run, after = _run_notebook(
        tmp_path,
        [
            'import lightstudy\nstudy = lightstudy.run("nbk.yaml", workers=1)',
            "import json\nprint(json.dumps({'best': study.best_trial.number, "
            "'n': len(study.optuna.trials), 'again': lightstudy.load('nbk').best_trial.number}))",
        ],
    )
    shown = [o for o in run if o["output_type"] == "display_data"]
    assert any(WIDGET in o["data"] for o in shown), run  # the live bar
    lines = [o["data"]["text/plain"] for o in shown if "text/plain" in o["data"]]
    assert sum("complete" in line and line.startswith("trial") for line in lines) == 2, lines
    stderr = "".join(o.get("text", "") for o in run if o.get("name") == "stderr")
    assert "A new study created" not in stderr and "Warning" not in stderr, stderr
    result = json.loads("".join(o.get("text", "") for o in after if o.get("name") == "stdout"))
    assert result["n"] == 2 and result["again"] == result["best"]
