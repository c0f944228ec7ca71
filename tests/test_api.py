"""The Python API as a notebook uses it: ``lightstudy.run`` in-process, then ``lightstudy.load``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_spec, write_spec


def test_import_lightstudy_is_light() -> None:
    """``import lightstudy`` and reading ``__all__`` import neither torch, Lightning nor optuna."""
    code = (
        "import sys, json, lightstudy; names = lightstudy.__all__; "
        "print(json.dumps({'names': names, 'heavy': sorted(m for m in ('torch', 'lightning', 'optuna', "
        "'pytorch_lightning', 'lightstudy.api') if m in sys.modules)}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["heavy"] == []
    assert {"run", "load", "create", "validate", "Study"} <= set(out["names"])


def test_every_public_name_resolves() -> None:
    import lightstudy

    for name in lightstudy.__all__:
        assert getattr(lightstudy, name) is not None, name
    assert lightstudy.run is __import__("lightstudy.api", fromlist=["run"]).run
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lightstudy.nope  # noqa: B018


@pytest.mark.slow
def test_run_then_load_as_a_notebook_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from rich.console import Console

    import lightstudy
    from lightstudy.ranking import best_first

    monkeypatch.chdir(tmp_path)
    doc = tiny_spec("nb", n_trials=3, max_epochs=1, checkpoints={"keep": 2})
    doc["trainer"].update(limit_train_batches=3, limit_val_batches=2)
    spec_path = write_spec(tmp_path / "nb.yaml", doc)

    shown = Console(record=True, width=200, force_jupyter=False)
    study = lightstudy.run(spec_path, workers=2, console=shown)
    text = shown.export_text()
    assert "2 worker(s)" in text and text.count("complete") >= 3, text

    assert isinstance(study, lightstudy.Study)
    assert isinstance(study.optuna, optuna.Study)
    trials = study.optuna.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    best = best_first(trials, study.optuna.directions)[0]
    assert study.best_trial.number == best.number
    assert study.best_value == best.values[0]
    assert study.best_params == best.params
    frame = study.trials_dataframe()  # pandas is a dependency: a notebook user's first look
    assert list(frame["number"]) == [t.number for t in trials]
    assert list(frame["state"]) == ["COMPLETE"] * 3
    assert "params_model.init_args.lr" in frame.columns

    # Later, in another cell (or kernel): the same study, from its database.
    again = lightstudy.load("nb", run_dir=tmp_path / "runs" / "nb")
    assert again.best_trial.number == study.best_trial.number
    assert again.best_params == study.best_params
    assert "nb" in repr(again)

    paths = again.export(tmp_path / "exported")
    assert yaml.safe_load(paths["config"].read_text())["model"]["init_args"]["lr"] == pytest.approx(
        study.best_params["model.init_args.lr"]
    )
    assert json.loads(paths["metrics"].read_text())["trial"] == study.best_trial.number
    tested = again.test(top=2)
    assert len(tested) == 2 and all("test_acc" in m for m in tested.values())
    # Each tested trial's note in optuna-dashboard now says what a person looks for.
    from optuna_dashboard import get_note

    best_number = study.best_trial.number
    note = get_note(optuna.trial.Trial(again.optuna, study.best_trial._trial_id))
    assert note.startswith(f"## Trial {best_number}: complete")
    assert "**Checkpoint:** kept" in note and "**Test:** test_acc = " in note
    assert "`model.init_args.lr` = " in note and "**Config:** ConvNet · DigitsDataModule · max_epochs=1" in note
    predictions = again.predict(tmp_path / "pred.csv")
    assert predictions.trial == study.best_trial.number and predictions.rows > 0
    page = again.report(tmp_path / "report.html")
    assert page.read_text().startswith("<!DOCTYPE html>") or "<html" in page.read_text()[:500]


def test_load_a_missing_study_says_so(tmp_path: Path) -> None:
    import lightstudy
    from lightstudy.errors import LightstudyError

    with pytest.raises(LightstudyError, match=r"study\.db"):
        lightstudy.load("absent", run_dir=tmp_path)


def test_run_with_a_bad_spec_raises_the_cli_message(tmp_path: Path) -> None:
    import lightstudy

    doc = tiny_spec("bad")
    doc["model"]["class_path"] = "nowhere_module.Net"
    path = write_spec(tmp_path / "bad.yaml", doc)
    with pytest.raises(lightstudy.SpecError, match=r"model\.class_path: does not import .*looked in"):
        lightstudy.run(path, workers=1)
