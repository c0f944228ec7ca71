"""The studies shipped in studies/: each validates, and the default one does what the README says."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import REPO, cli
from lightstudy.spec import load_spec
from lightstudy.study import load_study

STUDIES = sorted((REPO / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_study_file_validates(path: Path) -> None:
    from lightstudy.lightning_config import check_spec

    check_spec(load_spec(path))


@pytest.mark.slow
def test_default_digits_study_meets_its_promise(tmp_path: Path) -> None:
    """`lightstudy run studies/digits.yaml`, as the README runs it, on 2 CPU workers."""
    import lightning.pytorch as lp

    from lightstudy.examples import ConvNet, DigitsDataModule

    result = cli("run", str(REPO / "studies" / "digits.yaml"), "--workers", "2", cwd=tmp_path, check=True)
    assert "best trial of digits" in result.stdout
    spec = load_spec(REPO / "studies" / "digits.yaml")
    study, _ = load_study(f"sqlite:///{tmp_path / 'runs/digits/study.db'}", "digits")
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == len(trials) == spec.study.n_trials
    assert any(t.state == TrialState.PRUNED for t in trials)
    assert study.best_value >= 0.97
    files = glob.glob(str(tmp_path / "runs/digits/**/*.ckpt"), recursive=True)
    assert len(files) == spec.study.checkpoints.keep

    best = tmp_path / "runs/digits" / study.best_trial.user_attrs["checkpoint"]
    model = ConvNet.load_from_checkpoint(best, weights_only=True)
    data = DigitsDataModule(**study.best_trial.user_attrs["config"]["data"]["init_args"])
    trainer = lp.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    score = trainer.validate(model, datamodule=data, verbose=False)[0]["val_acc"]
    assert score == pytest.approx(study.best_value, abs=1e-4)
