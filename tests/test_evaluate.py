from __future__ import annotations

import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import Finished, run_cli
from lightstudy.errors import CheckpointError, LightstudyError
from lightstudy.evaluate import exported_config, select_trial, stored_test_metrics
from lightstudy.study import load_study


def test_select_trial_by_rank_and_number(finished_study: Finished) -> None:
    study, spec = load_study(finished_study.url, finished_study.name)
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))
    assert select_trial(study, spec).number == complete[0].number
    assert select_trial(study, spec, rank=2).number == complete[1].number
    with pytest.raises(LightstudyError, match="--rank must be between 1 and"):
        select_trial(study, spec, rank=99)
    with pytest.raises(LightstudyError, match="has no trial 42"):
        select_trial(study, spec, number=42)


def test_exported_config_drops_what_lightstudy_added(finished_study: Finished) -> None:
    study, spec = load_study(finished_study.url, finished_study.name)
    config = exported_config(study.best_trial, spec)
    assert "logger" not in config["trainer"] and "default_root_dir" not in config["trainer"]
    assert config["trainer"]["max_epochs"] == 3
    assert config["seed_everything"] == study.best_trial.user_attrs["seed"]
    assert config["model"]["init_args"]["lr"] == study.best_trial.params["model.init_args.lr"]


@pytest.mark.slow(seconds=15)
def test_export_trains_with_plain_lightning_cli_and_scores_the_recorded_value(
    finished_study: Finished, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    run_cli(
        "best",
        finished_study.name,
        "--storage",
        finished_study.url,
        "--run-dir",
        str(finished_study.run_dir),
        "--export",
        str(out),
        check=True,
    )
    study, _ = load_study(finished_study.url, finished_study.name)
    best = study.best_trial
    ckpts = list(out.glob("*.ckpt"))
    assert len(ckpts) == 1
    assert json.loads((out / "params.json").read_text()) == best.params
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trial"] == best.number and metrics["values"]["val_acc"] == best.value
    main = tmp_path / "main.py"
    main.write_text(
        "from lightning.pytorch.cli import LightningCLI\n\nif __name__ == '__main__':\n    LightningCLI()\n"
    )
    # A plain LightningCLI script trains from the exported config (one short epoch)...
    fit = subprocess.run(
        [
            sys.executable,
            str(main),
            "fit",
            "--config",
            str(out / "config.yaml"),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path / "fit"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    # ...and validates the exported checkpoint to the recorded value.
    val = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, json\n"
            "from lightning.pytorch.cli import LightningCLI\n"
            "cli = LightningCLI(run=False, args=['--config', sys.argv[1], '--trainer.logger', 'false'])\n"
            "r = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=sys.argv[2],"
            " verbose=False, weights_only=True)\n"
            "print(json.dumps(r[0]))\n",
            str(out / "config.yaml"),
            str(ckpts[0]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert val.returncode == 0, val.stderr[-3000:]
    score = json.loads(val.stdout.strip().splitlines()[-1])["val_acc"]
    assert score == pytest.approx(best.value, abs=1e-6)


@pytest.mark.slow(seconds=8)
def test_test_command_stores_metrics_shown_by_best_and_status(finished_study: Finished) -> None:
    args = ["--storage", finished_study.url, "--run-dir", str(finished_study.run_dir)]
    result = run_cli("test", finished_study.name, *args, "--top", "2", check=True)
    assert "test_acc" in result.stdout
    study, _ = load_study(finished_study.url, finished_study.name)
    stored = stored_test_metrics(study)
    assert len(stored) == 2 and all(0.0 < m["test_acc"] <= 1.0 for m in stored.values())
    best = json.loads(run_cli("best", finished_study.name, *args, "--format", "json", check=True).stdout)
    assert best["test_metrics"]["test_acc"] == stored[best["number"]]["test_acc"]
    status = run_cli("status", finished_study.name, "--storage", finished_study.url, check=True)
    assert "test_acc" in status.stdout


def test_errors_for_unkept_missing_and_empty(finished_study: Finished, tmp_path: Path) -> None:
    from lightstudy.evaluate import fetch

    study, spec = load_study(finished_study.url, finished_study.name)
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number))
    with pytest.raises(CheckpointError, match="has no kept checkpoint"):
        fetch(study, spec, finished_study.run_dir, complete[-1], tmp_path)
    # A store that lost the file: a clear error, exit code 2 from the CLI.
    empty_run = tmp_path / "elsewhere"
    with pytest.raises(CheckpointError, match="is missing from"):
        fetch(study, spec, empty_run, complete[0], tmp_path)
    result = run_cli(
        "best",
        finished_study.name,
        "--storage",
        finished_study.url,
        "--run-dir",
        str(empty_run),
        "--export",
        str(tmp_path / "x"),
    )
    assert result.returncode == 2 and "is missing from" in result.stderr


def test_corrupted_checkpoint_is_a_clear_error(finished_study: Finished, tmp_path: Path) -> None:
    import shutil

    copy_run = tmp_path / "run"
    shutil.copytree(finished_study.run_dir / "artifacts", copy_run / "artifacts")
    for path in (copy_run / "artifacts").iterdir():
        path.write_bytes(path.read_bytes()[:200])
    result = run_cli(
        "best",
        finished_study.name,
        "--storage",
        finished_study.url,
        "--run-dir",
        str(copy_run),
        "--export",
        str(tmp_path / "x"),
    )
    assert result.returncode == 2
    assert "truncated or not a torch checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_study_without_finished_trials_is_a_clear_error(tmp_path: Path) -> None:
    from conftest import tiny_spec, write_spec

    spec = write_spec(tmp_path / "s.yaml", tiny_spec("empty"))
    url = f"sqlite:///{tmp_path / 'e.db'}"
    run_cli("create", str(spec), "--storage", url, check=True)
    for args in (
        ["best", "empty"],
        ["best", "empty", "--export", str(tmp_path / "x")],
        ["test", "empty"],
        ["report", "empty", "--out", str(tmp_path / "r.html")],
    ):
        result = run_cli(*args, "--storage", url)
        assert result.returncode == 2, args
        assert result.stderr.startswith("error:") and "fix:" in result.stderr


def _valueless(state: TrialState = TrialState.COMPLETE, values: list[float] | None = None) -> optuna.trial.FrozenTrial:
    """A complete trial without a usable value, as Optuna's own validation would refuse it (it
    happens to hand-made trials and to other clients' storages, not to lightstudy's workers)."""
    now = datetime.datetime.now()
    return optuna.trial.FrozenTrial(
        number=0,
        state=state,
        value=None,
        values=values,
        datetime_start=now,
        datetime_complete=now,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=0,
    )


def test_best_and_select_trial_agree_on_trials_without_values(tmp_path: Path) -> None:
    """evaluate ranked a complete trial without a value (and crashed on it), summary dropped it:
    both now go through lightstudy.ranking, which puts such trials last."""
    from conftest import tiny_spec
    from lightstudy.spec import spec_from_dict
    from lightstudy.summary import best_records

    spec = spec_from_dict(tiny_spec(checkpoints={"keep": 2}))
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    study_id = storage.get_study_id_from_name(study.study_name)
    storage.create_new_trial(study_id, template_trial=_valueless())  # trial 0: no value
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.7))  # 1
    storage.create_new_trial(study_id, template_trial=_valueless(values=[math.nan]))  # 2: NaN
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.9))  # 3
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))  # 4: not complete
    study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.7))  # 5: tie with 1
    expected = [3, 1, 5, 0, 2]
    assert [r.number for r in best_records(study, spec, tmp_path)] == expected
    assert [select_trial(study, spec, rank=i).number for i in range(1, 6)] == expected
    with pytest.raises(LightstudyError, match="between 1 and 5"):
        select_trial(study, spec, rank=6)
