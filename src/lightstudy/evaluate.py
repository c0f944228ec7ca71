"""Using what a study found: pick a kept trial, export it, test it, rebuild its model.

Everything starts from what the trial recorded: its fully resolved LightningCLI config (user
attr ``config``), its seed, and its checkpoint in the artifact store (loaded with
``weights_only=True``).
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy import ranking
from lightstudy.artifacts import CheckpointRef, describe_store, download, make_store
from lightstudy.checkpoints import load_checkpoint
from lightstudy.errors import CheckpointError, LightstudyError
from lightstudy.ranking import kept
from lightstudy.summary import TEST_ATTR_PREFIX, recorded_config, stored_test_metrics

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from lightstudy.lightning_config import Built
    from lightstudy.spec import StudySpec

__all__ = [
    "TEST_ATTR_PREFIX",
    "build_for_eval",
    "evaluate_on_test",
    "export_trial",
    "exported_config",
    "select_trial",
    "stored_test_metrics",
]

# Trainer arguments lightstudy sets for its workers; an exported config drops them unless the
# spec set them itself, so LightningCLI's defaults apply where it is used next.
INJECTED_TRAINER_ARGS = ("default_root_dir", "enable_progress_bar", "enable_model_summary", "logger")


def select_trial(
    study: optuna.Study, spec: StudySpec, *, rank: int | None = None, number: int | None = None
) -> FrozenTrial:
    """The ``rank``-th best complete trial (1 = best, in :mod:`lightstudy.ranking`'s order), or
    trial ``number``.

    Raises:
        LightstudyError: no complete trial, rank out of range, or no such trial.
    """
    from optuna.trial import TrialState

    if number is not None:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not trials:
            raise LightstudyError(
                f"study {spec.study.name!r} has no trial {number}",
                fix=f"see the trial numbers with: lightstudy status {spec.study.name}",
            )
        if trials[0].state != TrialState.COMPLETE:
            raise LightstudyError(
                f"trial {number} of study {spec.study.name!r} is {trials[0].state.name.lower()}, not complete",
                fix="pick a complete trial (lightstudy status shows them)",
            )
        return trials[0]
    ranked = ranking.ranked(study.get_trials(deepcopy=False), spec)
    if not ranked:
        raise LightstudyError(
            f"study {spec.study.name!r} has no complete trial yet",
            fix=f"run workers first: lightstudy worker --study {spec.study.name}",
        )
    rank = rank or 1
    if not 1 <= rank <= len(ranked):
        raise LightstudyError(
            f"--rank must be between 1 and {len(ranked)} (complete trials), but got {rank}",
            fix="pass a smaller --rank",
        )
    return ranked[rank - 1]


def _ref(trial: FrozenTrial, study: optuna.Study, spec: StudySpec) -> CheckpointRef:
    ref = CheckpointRef.of(trial)
    if ref is None or trial.number not in {t.number for t in kept(study.get_trials(deepcopy=False), spec)}:
        raise CheckpointError(
            f"trial {trial.number} has no kept checkpoint (the study keeps the best {spec.study.checkpoints.keep})",
            fix="choose a kept trial (lightstudy best NAME lists them) or raise checkpoints.keep",
        )
    return ref


def exported_config(trial: FrozenTrial, spec: StudySpec) -> dict[str, Any]:
    """The trial's resolved config, as ``LightningCLI fit --config`` takes it.

    Raises:
        LightstudyError: the trial recorded no config (it failed before training).
    """
    config = recorded_config(trial)
    if config is None:
        raise LightstudyError(
            f"trial {trial.number} recorded no config (it ended before training started)",
            fix="choose a complete trial",
        )
    config = copy.deepcopy(config)
    trainer = config.get("trainer") or {}
    user_trainer = spec.config.get("trainer") or {}
    for key in INJECTED_TRAINER_ARGS:
        if key not in user_trainer:
            trainer.pop(key, None)
    return config


def build_for_eval(
    config: dict[str, Any], work_dir: Path, *, progress_bar: bool = False, cli: str | None = None
) -> Built:
    """Model, data and a quiet Trainer from a resolved config (no logger, output in ``work_dir``),
    through the study's LightningCLI subclass ``cli`` when it has one."""
    from lightstudy.lightning_config import build

    config = copy.deepcopy(config)
    trainer = config.setdefault("trainer", {})
    trainer.update(
        logger=False,
        default_root_dir=str(work_dir),
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        # One process: a DDP trial's model evaluates and predicts the same on one device.
        devices=1,
        strategy="auto",
        num_nodes=1,
    )
    trainer.pop("callbacks", None)
    return build(config, callbacks=[], seed=config.get("seed_everything"), cli=cli)


def load_weights(built: Built, checkpoint: dict[str, Any], label: str) -> None:
    """Load a checkpoint's state_dict into the freshly built model.

    Raises:
        CheckpointError: the weights do not fit the model the config describes.
    """
    try:
        built.model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(
            f"checkpoint {label} does not fit the model of its trial's config ({first})",
            fix="export the checkpoint and the config together (lightstudy best NAME --export DIR)",
        ) from e


def fetch(study: optuna.Study, spec: StudySpec, run_dir: Path, trial: FrozenTrial, dest: Path) -> Path:
    """Download a kept trial's checkpoint to the folder ``dest`` and check it loads safely."""
    ref = _ref(trial, study, spec)
    store = make_store(spec, run_dir)
    path = download(store, ref, dest / ref.filename, describe_store(spec, run_dir))
    load_checkpoint(path, name=f"{ref.filename} (trial {trial.number})")
    return path


def export_trial(
    study: optuna.Study, spec: StudySpec, run_dir: Path, trial: FrozenTrial, dest: Path
) -> dict[str, Path]:
    """Write the trial's checkpoint, ``config.yaml``, ``params.json`` and ``metrics.json`` to ``dest``."""
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    config = exported_config(trial, spec)
    checkpoint = fetch(study, spec, run_dir, trial, dest)
    paths = {
        "checkpoint": checkpoint,
        "config": dest / "config.yaml",
        "params": dest / "params.json",
        "metrics": dest / "metrics.json",
    }
    paths["config"].write_text(
        f"# Trial {trial.number} of study {spec.study.name!r}, resolved by lightstudy.\n"
        "# Train it again with LightningCLI: python main.py fit --config config.yaml\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    paths["params"].write_text(json.dumps(trial.params, indent=2) + "\n")
    metrics = {
        "trial": trial.number,
        "values": dict(zip(spec.study.metrics, trial.values)) if trial.values is not None else None,
        "intermediate_values": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "test": stored_test_metrics(study).get(trial.number),
        "seed": trial.user_attrs.get("seed"),
        "checkpoint": checkpoint.name,
    }
    paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    return paths


def evaluate_on_test(study: optuna.Study, spec: StudySpec, run_dir: Path, top: int) -> dict[int, dict[str, float]]:
    """Run ``trainer.test`` with the kept checkpoints of the best ``top`` trials; store the metrics.

    Raises:
        LightstudyError: no kept checkpoint; CheckpointError: one is missing or unsafe.
    """
    best = kept(study.get_trials(deepcopy=False), spec)
    if not best:
        raise LightstudyError(
            f"study {spec.study.name!r} keeps no checkpoint yet",
            fix="wait for a trial to complete (and keep checkpoints.keep above 0)",
        )
    results = {}
    for trial in best[:top]:
        with tempfile.TemporaryDirectory(prefix="lightstudy-test-") as tmp:
            path = fetch(study, spec, run_dir, trial, Path(tmp))
            checkpoint = load_checkpoint(path)
            built = build_for_eval(exported_config(trial, spec), Path(tmp), cli=spec.cli)
            load_weights(built, checkpoint, path.name)
            out = built.trainer.test(built.model, datamodule=built.datamodule, verbose=False)
        metrics = {k: float(v) for k, v in (out[0] if out else {}).items()}
        study.set_user_attr(f"{TEST_ATTR_PREFIX}{trial.number}", metrics)
        results[trial.number] = metrics
    return results
