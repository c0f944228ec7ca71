"""Study-wide checkpoint retention: only the best k trials' best checkpoints stay on disk.

Each trial writes its checkpoints under ``<run dir>/trials/trial-NNNN/checkpoints/`` (a retry
continues in the folder of the trial it retries). The trial records its best checkpoint in the
``checkpoint`` user attr, relative to the run folder. After every finished trial a worker
recomputes the study's top k from the database and deletes every other checkpoint file, except in
folders of trials still running or waiting for a retry. The computation needs no lock: a file in
the top k of some view of the study is in the top k of every earlier view that holds it, so no
pass deletes what another pass keeps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from lightstudy.spec import StudySpec

__all__ = [
    "CHECKPOINT_ATTR",
    "enforce_retention",
    "kept_trials",
    "lineage_root",
    "pareto_front",
    "remove_checkpoints",
]

CHECKPOINT_ATTR = "checkpoint"
TRIAL_DIR_ATTR = "trial_dir"

_log = logging.getLogger(__name__)


def lineage_root(trial: FrozenTrial) -> int:
    """Number of the first trial of a retry chain (the trial itself when it is no retry)."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def kept_trials(trials: Sequence[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
    """The trials whose checkpoints the study keeps, best first (ties: lower number first).

    One objective: the best ``checkpoints.keep`` complete trials. Several: the Pareto front.
    """
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(CHECKPOINT_ATTR)]
    keep = spec.study.checkpoints.keep
    if keep == 0 or not done:
        return []
    if spec.study.is_multi_objective:
        return pareto_front(done, spec.study.directions)
    sign = -1.0 if spec.study.direction == "maximize" else 1.0
    ranked = sorted(done, key=lambda t: (sign * float(t.values[0]), t.number))
    return ranked[:keep]


def pareto_front(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """The complete trials no other trial dominates, by number."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    scored = [(t, [s * v for s, v in zip(signs, t.values)]) for t in trials]

    def dominated(v: list[float]) -> bool:
        return any(all(x >= y for x, y in zip(o, v)) and any(x > y for x, y in zip(o, v)) for _, o in scored)

    return sorted((t for t, v in scored if not dominated(v)), key=lambda t: t.number)


def remove_checkpoints(run_dir: Path, trial_dir: str) -> None:
    """Delete a trial folder's checkpoints (logs stay)."""
    folder = run_dir / trial_dir / "checkpoints"
    for path in folder.glob("*.ckpt"):
        path.unlink(missing_ok=True)


def enforce_retention(study: optuna.Study, spec: StudySpec, run_dir: Path) -> list[Path]:
    """Delete every checkpoint file not kept by the study; returns the files deleted."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    kept = {(run_dir / t.user_attrs[CHECKPOINT_ATTR]).resolve() for t in kept_trials(trials, spec)}
    live = {lineage_root(t) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
    deleted = []
    for folder in sorted((run_dir / "trials").glob("trial-*")):
        try:
            root = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if root in live:
            continue
        for path in (folder / "checkpoints").glob("*.ckpt"):
            if path.resolve() not in kept:
                path.unlink(missing_ok=True)
                deleted.append(path)
    if deleted:
        _log.info(
            "retention: removed %d checkpoint(s) outside the study's top %d",
            len(deleted),
            spec.study.checkpoints.keep,
        )
    return deleted
