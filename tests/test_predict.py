from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import Finished, run_cli
from lightstudy.errors import LightstudyError
from lightstudy.examples import DigitsDataModule
from lightstudy.study import load_study
from lightstudy.summary import recorded_config


@pytest.mark.slow(seconds=8)  # once finished_study is built
def test_predictions_match_the_best_trials_test_accuracy(finished_study: Finished, tmp_path: Path) -> None:
    args = ["--storage", finished_study.url, "--run-dir", str(finished_study.run_dir)]
    run_cli("test", finished_study.name, *args, check=True)
    out = tmp_path / "predictions.csv"
    result = run_cli("predict", finished_study.name, *args, "--out", str(out), check=True)
    assert "wrote 359 predictions" in result.stdout
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    study, _ = load_study(finished_study.url, finished_study.name)
    best = study.best_trial
    data = DigitsDataModule(**recorded_config(best)["data"]["init_args"])
    data.setup("predict")
    labels = data._splits["test"].tensors[1]
    assert len(rows) == len(labels) == 359
    predicted = torch.tensor([int(r["prediction"]) for r in rows])
    accuracy = float((predicted == labels).float().mean())
    test_acc = study.user_attrs[f"lightstudy.test.{best.number}"]["test_acc"]
    assert accuracy == pytest.approx(test_acc, abs=1e-6)


@pytest.mark.slow(seconds=8)  # once finished_study is built
def test_predict_files_and_pt_output(finished_study: Finished, tmp_path: Path) -> None:
    from PIL import Image

    files = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        Image.new("L", (8, 8), color=40 * i).save(path)
        files.append(str(path))
    out = tmp_path / "p.pt"
    run_cli(
        "predict",
        finished_study.name,
        *files,
        "--storage",
        finished_study.url,
        "--run-dir",
        str(finished_study.run_dir),
        "--out",
        str(out),
        "--rank",
        "2",
        check=True,
    )
    predictions = torch.load(out, weights_only=True)
    assert predictions.shape == (3,)
    csv_out = tmp_path / "p.csv"
    run_cli(
        "predict",
        finished_study.name,
        *files,
        "--storage",
        finished_study.url,
        "--run-dir",
        str(finished_study.run_dir),
        "--out",
        str(csv_out),
        check=True,
    )
    with open(csv_out) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == files


def test_predict_refuses_bad_output_and_missing_files(finished_study: Finished, tmp_path: Path) -> None:
    from lightstudy.predict import predict

    study, spec = load_study(finished_study.url, finished_study.name)
    with pytest.raises(LightstudyError, match=r"\.csv or \.pt"):
        predict(study, spec, finished_study.run_dir, tmp_path / "p.txt")
    with pytest.raises(LightstudyError, match="no such file"):
        predict(study, spec, finished_study.run_dir, tmp_path / "p.csv", files=[tmp_path / "none.png"])
