"""``lightstudy reproduce``: train a finished trial again from its record and compare.

The record is what the trial stored when it started: its fully resolved LightningCLI config, its
seed, the torch threads it ran with and the package versions. On CPU with
``trainer.deterministic: true`` the new value matches the recorded one to 1e-6.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy.errors import LightstudyError
from lightstudy.summary import recorded_config

if TYPE_CHECKING:
    import optuna

    from lightstudy.spec import StudySpec

__all__ = ["Reproduction", "reproduce"]


@dataclass
class Reproduction:
    """The recorded and the new objective values of one trial."""

    trial: int
    metrics: list[str]
    recorded: list[float]
    new: list[float]
    changed_versions: dict[str, tuple[str, str]] = field(default_factory=dict)  # name: (then, now)
    resumed: bool = False  # the recorded run resumed from a checkpoint of an earlier attempt

    @property
    def differences(self) -> list[float]:
        return [n - r for n, r in zip(self.new, self.recorded)]


def reproduce(study: optuna.Study, spec: StudySpec, number: int, work_dir: Path | None = None) -> Reproduction:
    """Re-run trial ``number`` from its record (no pruning; same epochs, seed and threads).

    Raises:
        LightstudyError: no such complete trial, or it recorded no config.
    """
    import torch

    from lightstudy.evaluate import select_trial
    from lightstudy.trial import _versions, fit_config

    trial = select_trial(study, spec, number=number)
    config = recorded_config(trial)
    if config is None:
        raise LightstudyError(
            f"trial {number} recorded no config (it was run before lightstudy recorded configs)",
            fix="reproduce a trial run by this version of lightstudy",
        )
    from lightstudy.spec import trial_world_size

    if trial_world_size(config) > 1:
        raise LightstudyError(
            f"trial {number} ran on several devices (DDP); reproduce runs one process",
            fix="re-run the study's spec with lightstudy run and compare, or set trainer.devices: 1",
        )
    config = copy.deepcopy(config)
    threads = trial.user_attrs.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory(prefix="lightstudy-reproduce-") as tmp:
        root = Path(work_dir or tmp)
        trainer = config.setdefault("trainer", {})
        trainer.update(logger=False, default_root_dir=str(root), enable_progress_bar=False)
        fitted = fit_config(
            config, spec.study, ckpt_dir=root / "checkpoints", seed=trial.user_attrs.get("seed"), cli=spec.cli
        )
    recorded_versions: dict[str, Any] = trial.user_attrs.get("versions") or {}
    now = _versions(recorded_versions.get("namespace", "lightning.pytorch"))
    changed = {
        name: (str(then), str(now.get(name)))
        for name, then in recorded_versions.items()
        if name not in ("platform",) and str(now.get(name)) != str(then)
    }
    return Reproduction(
        trial=number,
        metrics=list(spec.study.metrics),
        recorded=list(trial.values),
        new=fitted.values,
        changed_versions=changed,
        resumed=bool(trial.user_attrs.get("resumed_from")),
    )
