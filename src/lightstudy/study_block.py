"""The ``study:`` block of a spec: how to search (name, objectives, budget, sampler, pruner,
checkpoints, heartbeats, queued configurations), parsed into frozen dataclasses with errors that
name the key, the rule, the value and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightstudy.errors import SpecError, did_you_mean

__all__ = ["CheckpointSettings", "Component", "StudySettings", "parse_component", "parse_study"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# Metric-name words that say which way is better; a direction that contradicts them is an error.
_HIGHER_IS_BETTER = {
    "acc",
    "accuracy",
    "f1",
    "fbeta",
    "auroc",
    "auc",
    "precision",
    "recall",
    "iou",
    "jaccard",
    "dice",
    "r2",
    "map",
    "bleu",
    "psnr",
    "ssim",
}
_LOWER_IS_BETTER = {"loss", "error", "err", "mse", "mae", "rmse", "nll", "perplexity", "ppl", "wer", "cer"}


@dataclass(frozen=True)
class Component:
    """A sampler or pruner: an ``optuna.samplers``/``optuna.pruners`` class name or a class path."""

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **copy.deepcopy(dict(self.kwargs))}


@dataclass(frozen=True)
class CheckpointSettings:
    """Study-wide checkpoint retention, in Optuna's artifact store."""

    keep: int = 3  # trials whose best checkpoint is kept, study-wide (0 keeps none)
    store: str | None = None  # a folder or s3://bucket/prefix; None: <run dir>/artifacts
    endpoint_url: str | None = None  # S3-compatible server (MinIO, moto, ...); None: AWS

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"keep": self.keep}
        if self.store is not None:
            out["store"] = self.store
        if self.endpoint_url is not None:
            out["endpoint_url"] = self.endpoint_url
        return out


@dataclass(frozen=True)
class StudySettings:
    """The ``study:`` block."""

    name: str
    directions: tuple[str, ...] = ("maximize",)
    metrics: tuple[str, ...] = ("val_acc",)
    storage: str | None = None  # SQLAlchemy URL; None: LIGHTSTUDY_STORAGE or the run folder's SQLite
    n_trials: int | None = None  # study-wide, across all workers and machines
    timeout: float | None = None  # seconds from the study's first trial, study-wide
    seed: int | None = 0  # base of every trial's seed and of the sampler's
    sampler: Component = Component("TPESampler")
    pruner: Component = Component("MedianPruner")
    checkpoints: CheckpointSettings = CheckpointSettings()
    run_dir: str | None = None  # where checkpoints and logs go; None: runs/<name> under the cwd
    trial_timeout: float | None = None  # seconds one trial may run before it is failed
    max_retry: int = 2  # retries of a trial whose worker or process died
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 60  # seconds without heartbeat before a trial counts as dead
    enqueue: tuple[Mapping[str, Any], ...] = ()  # parameter sets to evaluate first (Optuna's enqueue_trial)

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def direction(self) -> str:
        return self.directions[0]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.directions) > 1


_STUDY_KEYS = {f.name for f in dataclasses.fields(StudySettings)} - {"directions", "metrics"}
_STUDY_KEYS |= {"direction", "directions", "metric", "metrics"}


def parse_study(source: str, raw: Any) -> StudySettings:
    if not isinstance(raw, Mapping):
        raise SpecError(source, "study", "must be a mapping", raw, fix="write `study: {name: my-study, ...}`")
    for key in raw:
        if key not in _STUDY_KEYS:
            raise SpecError(
                source,
                f"study.{key}",
                "is not a key of the study block",
                raw[key],
                fix=did_you_mean(key, sorted(_STUDY_KEYS)),
            )
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(
            source,
            "study.name",
            "must be 1-100 letters, digits, '_', '.' or '-' (it names the run folder)",
            name,
            fix="e.g. name: digits",
        )
    directions, metrics = _parse_objectives(source, raw)
    _check_budget_and_heartbeat(source, raw)
    defaults = StudySettings(name=name)
    return StudySettings(
        name=name,
        directions=directions,
        metrics=metrics,
        storage=_storage(source, raw),
        n_trials=_positive_int(source, raw, "n_trials"),
        timeout=_positive_number(source, raw, "timeout"),
        seed=_seed(source, raw),
        sampler=parse_component(source, "study.sampler", raw.get("sampler", "TPESampler"), allow_none=False),
        pruner=parse_component(source, "study.pruner", raw.get("pruner", "MedianPruner"), allow_none=True),
        checkpoints=_parse_checkpoints(source, raw.get("checkpoints")),
        run_dir=_optional(source, raw, "run_dir", str, "a folder path such as runs/digits"),
        trial_timeout=_positive_number(source, raw, "trial_timeout"),
        max_retry=_count(source, raw, "max_retry", defaults.max_retry),
        heartbeat_interval=_positive_int(source, raw, "heartbeat_interval") or defaults.heartbeat_interval,
        grace_period=_positive_int(source, raw, "grace_period") or defaults.grace_period,
        enqueue=_parse_enqueue(source, raw.get("enqueue")),
    )


def _check_budget_and_heartbeat(source: str, raw: Mapping[str, Any]) -> None:
    if raw.get("n_trials") is None and raw.get("timeout") is None:
        raise SpecError(
            source,
            "study.n_trials",
            "a study needs a budget: n_trials or timeout (or both)",
            None,
            fix="set e.g. n_trials: 40",
        )
    hb, grace = raw.get("heartbeat_interval"), raw.get("grace_period")
    if isinstance(hb, int) and isinstance(grace, int) and grace <= hb:
        raise SpecError(
            source,
            "study.grace_period",
            "must be longer than heartbeat_interval",
            grace,
            fix=f"set grace_period to at least {2 * hb}",
        )


def _parse_objectives(source: str, raw: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if "direction" in raw and "directions" in raw:
        raise SpecError(
            source,
            "study.directions",
            "cannot be given with study.direction",
            raw["directions"],
            fix="keep one: direction (one metric) or directions (several)",
        )
    if "metric" in raw and "metrics" in raw:
        raise SpecError(
            source,
            "study.metrics",
            "cannot be given with study.metric",
            raw["metrics"],
            fix="keep one: metric (one objective) or metrics (several)",
        )
    multi = "directions" in raw or "metrics" in raw
    dkey, mkey = ("study.directions", "study.metrics") if multi else ("study.direction", "study.metric")
    directions = raw.get("directions") if multi else [raw.get("direction", "maximize")]
    metrics = raw.get("metrics") if multi else [raw.get("metric")]
    if not isinstance(directions, list) or not directions:
        raise SpecError(
            source,
            dkey,
            "must be a list of minimize/maximize",
            directions,
            fix="e.g. directions: [maximize, minimize]",
        )
    if not isinstance(metrics, list) or not metrics:
        raise SpecError(
            source,
            mkey,
            "must be a list of metric names",
            metrics,
            fix="e.g. metrics: [val_acc, param_count]",
        )
    for d in directions:
        if d not in ("minimize", "maximize"):
            raise SpecError(
                source, dkey, "must be minimize or maximize", d, fix="write direction: maximize (or minimize)"
            )
    for m in metrics:
        if not isinstance(m, str) or not m:
            raise SpecError(source, mkey, "must name a metric the LightningModule logs", m, fix="e.g. metric: val_acc")
    if len(directions) != len(metrics):
        raise SpecError(
            source,
            dkey,
            f"needs one direction per metric ({len(metrics)} metrics)",
            directions,
            fix="give as many directions as metrics",
        )
    if len(set(metrics)) != len(metrics):
        raise SpecError(source, mkey, "must not repeat a metric", metrics, fix="list each metric once")
    for d, m in zip(directions, metrics):
        words = set(re.split(r"[^a-z0-9]+", m.lower()))
        if d == "maximize" and words & _LOWER_IS_BETTER:
            raise SpecError(
                source,
                dkey,
                f"maximize contradicts metric {m!r}, where lower is better",
                d,
                fix=f"set minimize for {m}, or name a higher-is-better metric",
            )
        if d == "minimize" and words & _HIGHER_IS_BETTER and not words & _LOWER_IS_BETTER:
            raise SpecError(
                source,
                dkey,
                f"minimize contradicts metric {m!r}, where higher is better",
                d,
                fix=f"set maximize for {m}, or name a lower-is-better metric",
            )
    return tuple(directions), tuple(metrics)


def parse_component(source: str, key: str, raw: Any, *, allow_none: bool) -> Component:
    """``TPESampler``, ``{name: TPESampler, seed: 1}`` or ``{class_path: x.Y, init_args: {..}}``."""
    if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "nop")):
        if allow_none:
            return Component("NopPruner")
        raise SpecError(source, key, "must name an Optuna sampler", raw, fix="e.g. sampler: TPESampler")
    if isinstance(raw, str):
        return Component(raw)
    if not isinstance(raw, Mapping):
        raise SpecError(
            source,
            key,
            "must be a class name or a mapping with `name:`",
            raw,
            fix="e.g. {name: TPESampler, multivariate: true}",
        )
    if "class_path" in raw:
        extra = set(raw) - {"class_path", "init_args"}
        if extra:
            raise SpecError(
                source,
                f"{key}.{sorted(extra)[0]}",
                "is not allowed beside class_path",
                raw[sorted(extra)[0]],
                fix="put arguments under init_args",
            )
        name, kwargs = raw["class_path"], raw.get("init_args") or {}
    else:
        kwargs = {k: v for k, v in raw.items() if k != "name"}
        name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise SpecError(source, f"{key}.name", "must be a class name", name, fix="e.g. name: TPESampler")
    if not isinstance(kwargs, Mapping):
        raise SpecError(source, f"{key}.init_args", "must be a mapping", kwargs, fix="e.g. {seed: 0}")
    return Component(name, dict(kwargs))


def _parse_checkpoints(source: str, raw: Any) -> CheckpointSettings:
    if raw is None:
        return CheckpointSettings()
    if not isinstance(raw, Mapping):
        raise SpecError(source, "study.checkpoints", "must be a mapping", raw, fix="e.g. checkpoints: {keep: 3}")
    for key in raw:
        if key not in ("keep", "store", "endpoint_url"):
            raise SpecError(
                source,
                f"study.checkpoints.{key}",
                "is not a checkpoints key",
                raw[key],
                fix="use keep, store or endpoint_url",
            )
    store, endpoint = raw.get("store"), raw.get("endpoint_url")
    if store is not None and (not isinstance(store, str) or not store or store == "s3://"):
        raise SpecError(
            source,
            "study.checkpoints.store",
            "must be a folder path or s3://bucket[/prefix]",
            store,
            fix="e.g. store: s3://my-bucket/studies, or store: /shared/checkpoints",
        )
    if endpoint is not None:
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise SpecError(
                source,
                "study.checkpoints.endpoint_url",
                "must be an http(s) URL",
                endpoint,
                fix="e.g. endpoint_url: http://minio:9000",
            )
        if not (isinstance(store, str) and store.startswith("s3://")):
            raise SpecError(
                source,
                "study.checkpoints.endpoint_url",
                "only applies to an s3:// store",
                endpoint,
                fix="set store: s3://bucket/prefix, or drop endpoint_url",
            )
    return CheckpointSettings(
        keep=_count(source, raw, "keep", 3, prefix="study.checkpoints"), store=store, endpoint_url=endpoint
    )


def _optional(source: str, raw: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = raw.get(key)
    if value is not None and not isinstance(value, kind):
        raise SpecError(source, f"study.{key}", f"must be {what}", value, fix=f"set {key}: to {what}")
    return value


def _parse_enqueue(source: str, raw: Any) -> tuple[Mapping[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(e, Mapping) and e for e in raw):
        raise SpecError(
            source,
            "study.enqueue",
            "must be a list of parameter sets (search-space path: value)",
            raw,
            fix="e.g. enqueue: [{model.init_args.lr: 0.01, data.init_args.batch_size: 64}]",
        )
    return tuple(dict(e) for e in raw)


def _storage(source: str, raw: Mapping[str, Any]) -> str | None:
    from lightstudy.errors import StorageError
    from lightstudy.storage import check_url, redact

    url = _optional(source, raw, "storage", str, "a SQLAlchemy URL such as sqlite:///runs/x/study.db")
    if url is not None:
        try:
            check_url(url)
        except StorageError as e:
            raise SpecError(source, "study.storage", e.message.split(": ", 1)[-1], redact(url), fix=e.fix) from e
    return url


def _positive_int(source: str, raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(
            source,
            f"study.{key}",
            "must be an integer >= 1",
            value,
            fix=f"set {key}: to a positive whole number",
        )
    return value


def _positive_number(source: str, raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise SpecError(
            source,
            f"study.{key}",
            "must be a number of seconds > 0 (or null)",
            value,
            fix=f"set {key}: to e.g. 3600",
        )
    return float(value)


def _count(source: str, raw: Mapping[str, Any], key: str, default: int, prefix: str = "study") -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SpecError(source, f"{prefix}.{key}", "must be an integer >= 0", value, fix=f"set {key}: to 0 or more")
    return value


def _seed(source: str, raw: Mapping[str, Any]) -> int | None:
    value = raw.get("seed", 0)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise SpecError(
            source,
            "study.seed",
            "must be an integer >= 0 or null",
            value,
            fix="set seed: 0 (or null for a random seed)",
        )
    return value
