from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_spec
from lightstudy.spec import spec_from_dict
from lightstudy.study import claim_trial, create_study, load_study
from lightstudy.summary import CONFIG_ATTR, recorded_config
from lightstudy.trial import TrialJob, TrialOutcome, run_trial, trial_dir_name


def _run(tmp_path: Path, doc: dict[str, Any]) -> tuple[TrialOutcome, Any]:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = spec_from_dict(doc)
    create_study(spec, url)
    study, spec = load_study(url, spec.study.name)
    trial, _ = claim_trial(study, spec)
    assert trial is not None
    job = TrialJob(
        storage_url=url,
        study_name=spec.study.name,
        trial_id=trial._trial_id,
        number=trial.number,
        spec=spec,
        params=dict(trial.params),
        seed=7,
        run_dir=str(tmp_path / "run"),
        trial_dir=trial_dir_name(trial.number),
        threads=1,
    )
    return run_trial(job), study.get_trials()[0]


def test_a_trial_trains_and_records_config_and_versions(tmp_path: Path) -> None:
    outcome, frozen = _run(tmp_path, tiny_spec())
    assert outcome.state == "complete", outcome.reason
    assert outcome.values is not None and 0.0 < outcome.values[0] <= 1.0
    assert outcome.checkpoint and (tmp_path / "run" / outcome.checkpoint).exists()
    assert recorded_config(frozen)["model"]["init_args"]["lr"] == frozen.params["model.init_args.lr"]
    assert recorded_config(frozen)["data"]["init_args"]["batch_size"] == frozen.params["data.init_args.batch_size"]
    assert frozen.user_attrs["versions"]["namespace"] == "lightning.pytorch"
    # the long config is a system attr (off the dashboard's page); the user attrs hold one line
    assert "config" not in frozen.user_attrs and recorded_config(frozen) == frozen.system_attrs[CONFIG_ATTR]
    assert (
        frozen.user_attrs["config_summary"].startswith("ConvNet · DigitsDataModule")
        and len(frozen.user_attrs["config_summary"]) <= 160
    )
    assert set(frozen.intermediate_values) == {0, 1}  # val_acc reported every epoch
    assert (tmp_path / "run" / "trials" / "trial-0000").is_dir()  # one log folder per trial


def test_pytorch_lightning_namespace_trains_with_its_own_trainer(tmp_path: Path) -> None:
    doc = tiny_spec()
    doc["model"]["class_path"] = "lightstudy.examples.classic.ConvNet"
    doc["data"]["class_path"] = "lightstudy.examples.classic.DigitsDataModule"
    outcome, frozen = _run(tmp_path, doc)
    assert outcome.state == "complete", outcome.reason
    assert frozen.user_attrs["versions"]["namespace"] == "pytorch_lightning"
    assert set(frozen.intermediate_values) == {0, 1}


def test_pruned_trial_ends_pruned(tmp_path: Path) -> None:
    doc = tiny_spec(pruner={"name": "ThresholdPruner", "lower": 2.0})
    outcome, _ = _run(tmp_path, doc)
    assert outcome.state == "pruned"
    assert "epoch 0" in (outcome.reason or "")


def test_missing_metric_lists_the_logged_ones(tmp_path: Path) -> None:
    doc = tiny_spec()
    doc["model"]["class_path"] = "lightstudy_testing_models.SilentNet"
    outcome, _ = _run(tmp_path, doc)
    assert outcome.state == "failed"
    assert "'val_acc' was not logged" in (outcome.reason or "")
    assert "val_loss" in (outcome.reason or "")


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("NaNNet", "training loss became nan"),
        ("RaisingNet", "ValueError: boom: the model raised on purpose"),
        ("OOMNet", "OutOfMemoryError: CUDA out of memory"),
    ],
)
def test_failures_carry_a_readable_reason(tmp_path: Path, model: str, reason: str) -> None:
    doc = tiny_spec()
    doc["model"]["class_path"] = f"lightstudy_testing_models.{model}"
    outcome, _ = _run(tmp_path, doc)
    assert outcome.state == "failed"
    assert reason in (outcome.reason or ""), outcome.reason


def _epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def test_last_ckpt_is_every_finished_epoch_and_a_resume_overwrites_it(tmp_path: Path) -> None:
    """last.ckpt was written only on epochs that improved the metric (a retry resumed from an
    older epoch), and a resumed trial wrote last-v1.ckpt beside it."""
    import sys

    from lightstudy.trial import fit_config

    sys.path.insert(0, str(Path(__file__).parent))
    doc = tiny_spec(max_epochs=3)
    doc["model"]["class_path"] = "lightstudy_testing_models.WorseningNet"
    doc["trainer"].update(limit_train_batches=2, limit_val_batches=1)
    spec = spec_from_dict(doc)
    ckpt_dir = tmp_path / "checkpoints"
    config = spec.lightning_config()
    config["trainer"].update(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    fit_config(config, spec.study, ckpt_dir=ckpt_dir, seed=0)
    last = ckpt_dir / "last.ckpt"
    assert _epoch(last) == 2  # the last finished epoch, though only epoch 0 improved
    config = spec.lightning_config()
    config["trainer"].update(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False, max_epochs=5)
    fit_config(config, spec.study, ckpt_dir=ckpt_dir, seed=0, resume=str(last))
    assert sorted(p.name for p in ckpt_dir.glob("last*")) == ["last.ckpt"]
    assert _epoch(last) == 4
