"""Which checkpoints a study keeps, and loading them safely.

Study-wide top k: a trial that completes uploads its best checkpoint to the artifact store only
if it ranks among the best ``checkpoints.keep`` complete trials at that moment (ties: lower trial
number first; several objectives: the Pareto front), and after every finished trial the kept set
is recomputed from the database and every other stored checkpoint is removed. No lock is needed:
a trial that ranks in the top k of some view of the study ranks in the top k of every earlier
view that holds it, so no pass removes what another pass keeps, and a trial outside the top k
when it finishes can never enter it later.

With a scheduler the same holds among the lineages' furthest trials (the highest rung reached, or
the most epochs trained: :func:`lightstudy.scheduler.finals`): such a set only grows until a
higher level replaces it for good.

Local files (``<run dir>/trials/trial-NNNN/checkpoints``) serve a retry, and with a scheduler
the trials that start from them (:func:`needed_trials`): once nothing can need them they are deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from lightstudy.artifacts import CheckpointRef, is_listed, remove_checkpoint
from lightstudy.errors import CheckpointError
from lightstudy.storage.boundary import storage_of

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from lightstudy.spec import StudySpec

__all__ = [
    "CHECKPOINT_ATTR",
    "enforce_retention",
    "kept_trials",
    "lineage_root",
    "load_checkpoint",
    "needed_trials",
    "pareto_front",
    "remove_local",
    "sweep_local",
    "would_keep",
]

CHECKPOINT_ATTR = "checkpoint"
TRIAL_DIR_ATTR = "trial_dir"

_log = logging.getLogger(__name__)


def lineage_root(trial: FrozenTrial) -> int:
    """Number of the first trial of a retry chain (the trial itself when it is no retry)."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def pareto_front(trials: Sequence[FrozenTrial], directions: Sequence[str]) -> list[FrozenTrial]:
    """The trials no other trial dominates, by number (:func:`lightstudy.ranking.pareto_front`)."""
    from lightstudy import ranking

    return ranking.pareto_front(trials, directions)


def _rank(done: Sequence[Any], spec: StudySpec) -> list[Any]:
    """Best first; ties by lower number. Several objectives: the Pareto front by number."""
    if spec.study.is_multi_objective:
        return pareto_front(done, spec.study.directions)
    sign = -1.0 if spec.study.direction == "maximize" else 1.0
    ranked = sorted(done, key=lambda t: (sign * float(t.values[0]), t.number))
    return ranked[: spec.study.checkpoints.keep]


def _with_checkpoint(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    return [t for t in trials if t.state == TrialState.COMPLETE and CheckpointRef.of(t) is not None]


def kept_trials(trials: Sequence[FrozenTrial], spec: StudySpec) -> list[FrozenTrial]:
    """The trials whose checkpoints the study keeps, best first (several objectives: by number);
    with a scheduler, among the lineages' furthest trials (:func:`lightstudy.ranking.candidates`)."""
    from lightstudy import ranking

    if spec.study.checkpoints.keep == 0:
        return []
    return _rank(_with_checkpoint(ranking.candidates(trials, spec)), spec)


class _Candidate:
    def __init__(self, number: int, values: Sequence[float]) -> None:
        self.number = number
        self.values = list(values)


def would_keep(trials: Sequence[FrozenTrial], spec: StudySpec, number: int, values: Sequence[float]) -> bool:
    """Whether a trial completing now with ``values`` enters the kept set (:func:`lightstudy.ranking.would_keep`)."""
    from lightstudy import ranking

    return ranking.would_keep(trials, spec, number, values)


def enforce_retention(study: optuna.Study, spec: StudySpec, store: Any) -> list[int]:
    """Remove every stored checkpoint outside the kept set; returns the trial numbers removed."""
    trials = study.get_trials(deepcopy=False)
    kept = {t.number for t in kept_trials(trials, spec)}
    attrs = storage_of(study).study_system_attrs(study)
    removed = []
    for trial in _with_checkpoint(trials):
        ref = CheckpointRef.of(trial)
        if trial.number in kept or ref is None or not is_listed(study, trial, ref, attrs):
            continue
        remove_checkpoint(store, study, trial, ref)
        removed.append(trial.number)
    if removed:
        _log.info(
            "retention: removed the checkpoints of trial(s) %s, outside the study's top %d",
            ", ".join(map(str, removed)),
            spec.study.checkpoints.keep,
        )
    return removed


def remove_local(run_dir: Path, trial_dir: str) -> None:
    """Delete a trial folder's local checkpoint files (its logs stay)."""
    for path in (run_dir / trial_dir / "checkpoints").glob("*.ckpt"):
        path.unlink(missing_ok=True)


# How long a lineage with a trial that FAILed keeps its local files for the retry to come.
# The retry is queued by whoever told the FAIL (the trial's worker, or the claim that failed it
# as stale) right after the tell, but as a second write: a sweep in between must not take the
# checkpoint it is about to resume from. Minutes, so a database restart in between is covered.
RETRY_SETTLE = 600.0


def needed_trials(trials: Sequence[FrozenTrial], spec: StudySpec) -> set[int]:
    """Trials whose local checkpoint a scheduler still needs (:meth:`lightstudy.scheduler.Asha.needed_checkpoints`,
    :meth:`lightstudy.scheduler.Pbt.needed_checkpoints`): a running trial starts from it, or a
    rung may still promote it, or a member may still continue or copy it. None without a scheduler."""
    from lightstudy.scheduler import scheduler_of, views

    plan = scheduler_of(spec)
    return set() if plan is None else plan.needed_checkpoints(views(trials))


def sweep_local(
    study: optuna.Study, run_dir: Path, *, settle: float = RETRY_SETTLE, spec: StudySpec | None = None
) -> None:
    """Delete local checkpoint files of lineages that nothing continues, nor is about to.

    With ``spec`` (a study with a scheduler), the folders of :func:`needed_trials` stay too,
    counted from the same read of the trials: a trial that completes between two reads would be
    neither running in one nor needed in the other.

    A lineage stays while a trial of it runs or waits, and while a trial of it failed less than
    ``settle`` seconds ago (its retry may not be queued yet; once a retry finished, its worker
    has already deleted the files). A failure that is never retried is cleaned up by its own
    worker at once (``remove_local``) or, when that worker died, by a sweep after ``settle``.
    """
    import datetime as dt

    from optuna.trial import TrialState

    states = (TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL)
    cutoff = dt.datetime.now() - dt.timedelta(seconds=settle)
    scheduled = spec is not None and spec.study.scheduler is not None
    # only the trials that can keep a lineage (a scheduler's needs are read from all of them)
    trials = study.get_trials(deepcopy=False, states=None if scheduled else states)
    live = {
        lineage_root(t)
        for t in trials
        if t.state in states
        and (t.state != TrialState.FAIL or t.datetime_complete is None or t.datetime_complete > cutoff)
    }
    if scheduled:
        assert spec is not None
        needed = needed_trials(trials, spec)
        live |= {lineage_root(t) for t in trials if t.number in needed}
    for folder in (run_dir / "trials").glob("trial-*"):
        try:
            root = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if root not in live:
            for path in (folder / "checkpoints").glob("*.ckpt"):
                path.unlink(missing_ok=True)


def load_checkpoint(source: str | Path | IO[bytes], *, name: str | None = None) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``torch.load(weights_only=True)``: tensors and plain data
    only, so a tampered file cannot run code.

    Raises:
        CheckpointError: the file is missing, truncated, not a checkpoint, or holds objects that
            need unpickling code.
    """
    import pickle
    import zipfile

    import torch

    label = name or str(source)
    try:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {label} does not exist", fix="check the path") from e
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"checkpoint {label} is refused by the safe loader (weights_only=True): {first}",
            fix="load only checkpoints written by lightstudy or Lightning; this one may be tampered with",
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"checkpoint {label} is truncated or not a torch checkpoint ({first})",
            fix="re-export it from the study (lightstudy best NAME --export DIR), or retrain the trial",
        ) from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {label} is not a Lightning checkpoint (no state_dict)",
            fix="pass a .ckpt file written by Lightning's ModelCheckpoint",
        )
    return checkpoint
