"""Reading a study: counts, the best trial(s), per-trial rows and stored test metrics, for
``status``, ``best``, ``report`` and ``run``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightstudy import ranking
from lightstudy.artifacts import CheckpointRef, location
from lightstudy.errors import LightstudyError
from lightstudy.ranking import kept

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from lightstudy.spec import StudySpec

__all__ = [
    "CONFIG_ATTR",
    "TEST_ATTR_PREFIX",
    "TrialRecord",
    "best_records",
    "config_summary",
    "counts",
    "format_value",
    "lineages",
    "recorded_config",
    "stored_test_metrics",
    "trial_record",
]

TEST_ATTR_PREFIX = "lightstudy.test."  # study user attr per tested trial: its test metrics
# Trial system attr with the trial's resolved LightningCLI config: a record for lightstudy, kept
# out of the user attrs optuna-dashboard lays out (one ~1,350-character line widened its page).
# Trials recorded before it have the config in the user attr "config"; both are read.
CONFIG_ATTR = "lightstudy.config"


def recorded_config(trial: FrozenTrial) -> dict[str, Any] | None:
    """The resolved config a trial recorded (system attr, else the older user attr), or None."""
    config = trial.system_attrs.get(CONFIG_ATTR)
    if not isinstance(config, dict):
        config = trial.user_attrs.get("config")
    return config if isinstance(config, dict) else None


def config_summary(config: dict[str, Any], limit: int = 160) -> str:
    """One short line for a person: the classes and the trainer's epochs, e.g.
    ``TinyNet · BlobData · max_epochs=12`` (the full config stays in :data:`CONFIG_ATTR`)."""
    parts = []
    for section in ("model", "data", "optimizer", "lr_scheduler"):
        value = config.get(section)
        if isinstance(value, dict) and isinstance(value.get("class_path"), str):
            parts.append(value["class_path"].rsplit(".", 1)[-1])
    epochs = (config.get("trainer") or {}).get("max_epochs")
    if epochs is not None:
        parts.append(f"max_epochs={epochs}")
    text = " · ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials per state, lower-case names (complete, pruned, fail, running, waiting)."""
    c = Counter(t.state.name.lower() for t in trials)
    return {s: c.get(s, 0) for s in ("complete", "pruned", "fail", "running", "waiting")}


@dataclass
class TrialRecord:
    """A trial as lightstudy shows it."""

    number: int
    state: str
    values: list[float] | None
    params: dict[str, Any]
    checkpoint: str | None  # where the kept checkpoint is (file path or s3:// URL); None: not kept
    seed: int | None
    duration: float | None  # seconds
    attrs: dict[str, Any]
    test_metrics: dict[str, float] | None = None  # stored by `lightstudy test`

    def to_json(self, metrics: Sequence[str]) -> dict[str, Any]:
        return {
            "number": self.number,
            "state": self.state,
            "values": dict(zip(metrics, self.values)) if self.values else None,
            "params": self.params,
            "checkpoint": self.checkpoint,
            "seed": self.seed,
            "duration_s": self.duration,
            "test_metrics": self.test_metrics,
            "user_attrs": {k: v for k, v in self.attrs.items() if k not in ("config", "versions", "config_summary")},
        }


def trial_record(trial: FrozenTrial, spec: StudySpec, run_dir: Path, kept: set[int]) -> TrialRecord:
    checkpoint = None
    ref = CheckpointRef.of(trial)
    if ref is not None and trial.number in kept:
        checkpoint = location(spec, run_dir, ref)
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return TrialRecord(
        number=trial.number,
        state=trial.state.name.lower(),
        values=list(trial.values) if trial.values is not None else None,
        params=dict(trial.params),
        checkpoint=checkpoint,
        seed=trial.user_attrs.get("seed"),
        duration=duration,
        attrs=dict(trial.user_attrs),
    )


def best_records(study: optuna.Study, spec: StudySpec, run_dir: Path) -> list[TrialRecord]:
    """The complete trials best first (one objective) or the Pareto front (several), in
    :mod:`lightstudy.ranking`'s order, each with its kept checkpoint if it has one.

    Raises:
        LightstudyError: the study has no complete trial yet.
    """
    trials = study.get_trials(deepcopy=False)
    ranked = ranking.ranked(trials, spec)  # with a scheduler: the lineages' furthest trials
    if not ranked:
        c = counts(trials)
        raise LightstudyError(
            f"study {spec.study.name!r} has no complete trial yet "
            f"({c['running']} running, {c['pruned']} pruned, {c['fail']} failed)",
            fix=f"wait for a trial to finish, or run workers: lightstudy worker --study {spec.study.name}",
        )
    kept_numbers = {t.number for t in kept(trials, spec)}
    tests = stored_test_metrics(study)
    records = [trial_record(t, spec, run_dir, kept_numbers) for t in ranked]
    for record in records:
        record.test_metrics = tests.get(record.number)
    return records


def stored_test_metrics(study: optuna.Study) -> dict[int, dict[str, float]]:
    """Test metrics stored by ``lightstudy test``, by trial number."""
    out = {}
    for key, value in study.user_attrs.items():
        if key.startswith(TEST_ATTR_PREFIX):
            out[int(key[len(TEST_ATTR_PREFIX) :])] = value
    return out


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def lineages(trials: Sequence[FrozenTrial], spec: StudySpec, *, limit: int | None = None) -> list[str]:
    """One line per lineage of a scheduled study (none without a scheduler), best-reaching first.

    ASHA: its trials rung by rung, each with the epochs trained in all and the value at its last
    epoch (what the rung ranks). PBT: the member's parameter schedule over epochs: each trial's
    epochs, the parameters that changed, and the member it copied on an exploit.
    """
    from optuna.trial import TrialState

    from lightstudy.scheduler import TrialView

    settings = spec.study.scheduler
    if settings is None:
        return []
    pbt = settings.name == "PBT"
    groups: dict[int, list[TrialView]] = {}
    by_number = {}
    for t in trials:
        view = TrialView.of(t)
        by_number[t.number] = view
        if (view.generation if pbt else view.rung) is not None:
            groups.setdefault(view.lineage, []).append(view)
    short = {p.path: p.path.rsplit(".", 1)[-1] for p in spec.search_space}
    mark = {TrialState.RUNNING: " running", TrialState.WAITING: " waiting", TrialState.FAIL: " failed"}
    lines = []
    for lineage, group in groups.items():
        group.sort(key=lambda v: v.number)
        parts, previous, start = [], None, 0
        for v in group:
            score = v.score()
            value = format_value(score) if score is not None else "-"
            state = mark.get(v.state, "")
            parent = by_number.get(v.parent) if v.parent is not None else None
            if pbt:
                first = parent.epochs if parent is not None else 0
                changed = {k: x for k, x in v.params.items() if previous is None or previous.get(k) != x}
                text = ", ".join(f"{short.get(k, k)}={format_value(x)}" for k, x in changed.items())
                copied = f" from {parent.number}" if parent is not None and parent.lineage != lineage else ""
                what = f"{copied} {text}" if text else copied
                last = str(v.epochs) if v.epochs > first else ""
                parts.append(f"#{v.number} ep {first + 1}-{last}{what}: {value}{state}")
                if v.state == TrialState.COMPLETE:
                    previous = dict(v.params)
            else:
                parts.append(f"#{v.number} r{v.rung} {v.epochs} ep: {value}{state}")
            start = max(start, v.epochs)
        name = "member" if pbt else "lineage"
        lines.append((start, lineage, f"{name} {lineage}: " + " → ".join(parts)))
    lines.sort(key=lambda x: (-x[0], x[1]))
    out = [text for _, _, text in lines]
    return out if limit is None else out[:limit]
