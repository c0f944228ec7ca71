"""The ``study:`` block of a spec: how to search (name, objectives, budget, sampler, pruner or
scheduler, checkpoints, heartbeats, queued configurations), declared as frozen pydantic dataclasses whose
errors name the key, the rule, the value and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, MinLen
from pydantic import AfterValidator, BeforeValidator, Strict, StringConstraints, TypeAdapter, ValidationError
from pydantic import model_validator as validator
from pydantic.dataclasses import dataclass

from lightstudy.schema import CONFIG, known_keys, refuse, rule, spec_error

__all__ = [
    "AshaSettings",
    "CheckpointSettings",
    "Component",
    "PbtSettings",
    "SchedulerSettings",
    "StorageOptions",
    "StudySettings",
    "parse_component",
    "parse_study",
]

# Metric-name words that say which way is better; a direction that contradicts them is an error.
_HIGHER_IS_BETTER = {"acc", "accuracy", "f1", "fbeta", "auroc", "auc", "precision", "recall", "iou", "jaccard"}
_HIGHER_IS_BETTER |= {"dice", "r2", "map", "bleu", "psnr", "ssim"}
_LOWER_IS_BETTER = {"loss", "error", "err", "mse", "mae", "rmse", "nll", "perplexity", "ppl", "wer", "cer"}

Count = Annotated[int, Strict(), Ge(0), rule("must be an integer >= 0", "set {field}: to 0 or more")]
Positive = Annotated[int, Strict(), Ge(1), rule("must be an integer >= 1", "set {field}: to a positive whole number")]
Seconds = Annotated[
    float, Strict(), Gt(0), rule("must be a number of seconds > 0 (or null)", "set {field}: to e.g. 3600")
]
Direction = Annotated[str, Strict(), StringConstraints(pattern="^(minimize|maximize)$")]
Metric = Annotated[str, Strict(), MinLen(1)]


@dataclass(frozen=True, config=CONFIG)
class Component:
    """A sampler or pruner: an ``optuna.samplers``/``optuna.pruners`` class name or a class path."""

    name: Annotated[str, Strict(), MinLen(1), rule("must be a class name", "e.g. name: TPESampler")]
    kwargs: Annotated[Mapping[str, Any], rule("must be a mapping", "e.g. {seed: 0}")] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **copy.deepcopy(dict(self.kwargs))}


def _component_form(allow_none: bool) -> BeforeValidator:
    """``TPESampler``, ``{name: TPESampler, seed: 1}`` or ``{class_path: x.Y, init_args: {..}}``."""

    def normalize(raw: Any) -> Any:
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "nop")):
            if allow_none:
                return Component("NopPruner")
            raise refuse(None, "must name an Optuna sampler", raw, "e.g. sampler: TPESampler")
        if isinstance(raw, str):
            return {"name": raw}
        if not isinstance(raw, Mapping):
            raise refuse(None, "must be a class name or a mapping with `name:`", raw, "e.g. {name: TPESampler}")
        if "class_path" not in raw:
            return {"name": raw.get("name"), "kwargs": {k: v for k, v in raw.items() if k != "name"}}
        for key in set(raw) - {"class_path", "init_args"}:
            raise refuse(str(key), "is not allowed beside class_path", raw[key], "put arguments under init_args")
        return {"name": raw["class_path"], "kwargs": {} if raw.get("init_args") is None else raw["init_args"]}

    return BeforeValidator(normalize)


Sampler = Annotated[Component, _component_form(allow_none=False)]
Pruner = Annotated[Component, _component_form(allow_none=True)]


@dataclass(frozen=True, config=CONFIG)
class CheckpointSettings:
    """Study-wide checkpoint retention, in Optuna's artifact store."""

    keep: Count = 3  # trials whose best checkpoint is kept, study-wide (0 keeps none)
    store: (
        Annotated[
            str,
            Strict(),
            StringConstraints(pattern=r"^(?!s3://$).+"),
            rule("must be a folder path or s3://bucket[/prefix]", "e.g. store: s3://my-bucket/studies"),
        ]
        | None
    ) = None  # a folder or s3://bucket/prefix; None: <run dir>/artifacts
    endpoint_url: (
        Annotated[
            str,
            Strict(),
            StringConstraints(pattern=r"^https?://"),
            rule("must be an http(s) URL", "e.g. endpoint_url: http://minio:9000"),
        ]
        | None
    ) = None  # S3-compatible server (MinIO, moto, ...); None: AWS

    @validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        return known_keys(data, cls, what="must be a mapping", fix="e.g. checkpoints: {keep: 3}", noun="checkpoints")

    @validator(mode="after")
    def _endpoint_needs_s3(self) -> CheckpointSettings:
        if self.endpoint_url is not None and not (self.store or "").startswith("s3://"):
            raise refuse(
                "endpoint_url",
                "only applies to an s3:// store",
                self.endpoint_url,
                "set store: s3://bucket/prefix, or drop endpoint_url",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"keep": self.keep}
        if self.store is not None:
            out["store"] = self.store
        if self.endpoint_url is not None:
            out["endpoint_url"] = self.endpoint_url
        return out


def _on_off(raw: Any) -> Any:
    """YAML 1.1 reads a bare ``off``/``on`` as false/true: both spellings mean the same here."""
    if isinstance(raw, bool):
        return "on" if raw else "off"
    return raw.lower() if isinstance(raw, str) else raw


@dataclass(frozen=True, config=CONFIG)
class StorageOptions:
    """Settings of the workers' database sessions (PostgreSQL and SQLite; others ignore them)."""

    # off: a worker's commit returns before PostgreSQL has flushed it to disk, or SQLite has synced
    # its WAL file (see README, Storage)
    synchronous_commit: Annotated[
        Literal["on", "off"],
        BeforeValidator(_on_off),
        rule("must be on or off", "set synchronous_commit: off (or on, the default)"),
    ] = "on"

    @validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        fix = "e.g. storage_options: {synchronous_commit: off}"
        return known_keys(data, cls, what="must be a mapping", fix=fix, noun="storage_options")

    def to_dict(self) -> dict[str, Any]:
        return {"synchronous_commit": self.synchronous_commit}


Epochs = Annotated[int, Strict(), Ge(1), rule("must be a whole number of epochs >= 1", "e.g. {field}: 12")]
Fraction = Annotated[float, Strict(), Ge(0), Le(1), rule("must be a number from 0 to 1", "e.g. {field}: 0.25")]


@dataclass(frozen=True, config=CONFIG)
class AshaSettings:
    """Asynchronous successive halving with promotions (``lightstudy.scheduler.Asha``); resource = epochs."""

    name: Literal["ASHA"]
    max_resource: Epochs  # epochs of the top rung: a configuration never trains longer
    min_resource: Epochs = 1  # epochs of rung 0: every new configuration trains this long first
    reduction_factor: Annotated[
        int, Strict(), Ge(2), rule("must be an integer >= 2", "e.g. reduction_factor: 3 (keep the top third)")
    ] = 3  # rung k trains min_resource * reduction_factor**k epochs; the top 1/reduction_factor go on

    @validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        return known_keys(data, cls, what="must be a mapping", fix=_SCHEDULER_FIX, noun="an ASHA scheduler")

    @validator(mode="after")
    def _rungs(self) -> AshaSettings:
        if self.min_resource > self.max_resource:
            raise refuse(
                "min_resource",
                f"must be at most max_resource ({self.max_resource})",
                self.min_resource,
                "lower min_resource or raise max_resource",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, config=CONFIG)
class PbtSettings:
    """Population-based training (``lightstudy.scheduler.Pbt``); resource = epochs.

    Its budget is the population: ``population`` configurations, each trained ``max_resource``
    epochs at most; ``study.n_trials`` may be left out, and if given must not cut it short.
    """

    name: Literal["PBT"]
    max_resource: Epochs  # epochs each member of the population trains in all
    population: Annotated[
        int, Strict(), Ge(2), rule("must be an integer >= 2 (members that copy each other)", "e.g. population: 8")
    ] = 8  # configurations trained side by side; PBT samples exactly this many
    interval: Epochs = 2  # epochs between two exploit/explore decisions of a member
    quantile: Annotated[
        float, Strict(), Gt(0), Le(0.5), rule("must be a number > 0 and <= 0.5", "e.g. quantile: 0.25")
    ] = 0.25  # the bottom quantile copies a member of the top quantile
    resample_probability: Fraction = 0.25  # chance that explore draws a parameter afresh instead of perturbing it

    @validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        return known_keys(data, cls, what="must be a mapping", fix=_SCHEDULER_FIX, noun="a PBT scheduler")

    @validator(mode="after")
    def _interval(self) -> PbtSettings:
        if self.interval > self.max_resource:
            raise refuse(
                "interval",
                f"must be at most max_resource ({self.max_resource})",
                self.interval,
                "lower interval or raise max_resource",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SchedulerSettings = AshaSettings | PbtSettings
_SCHEDULER_FIX = "e.g. scheduler: {name: ASHA, min_resource: 1, max_resource: 12, reduction_factor: 3}"
_SCHEDULERS: dict[str, type] = {"ASHA": AshaSettings, "PBT": PbtSettings}


def _scheduler_form(raw: Any) -> Any:
    """The ``name:`` picks the settings class, so that an error names that scheduler's keys."""
    if raw is None or isinstance(raw, (AshaSettings, PbtSettings)):
        return raw
    if not isinstance(raw, Mapping):
        raise refuse(None, "must be a mapping with `name: ASHA` or `name: PBT`", raw, _SCHEDULER_FIX)
    name = raw.get("name")
    if name not in _SCHEDULERS:
        raise refuse("name", "must be ASHA or PBT", name, _SCHEDULER_FIX)
    try:
        return TypeAdapter(_SCHEDULERS[name]).validate_python(dict(raw))
    except ValidationError as e:
        nested = e.errors(include_url=False)[0]
        ctx = nested.get("ctx") or {}
        at = ".".join([str(p) for p in nested["loc"]] + ([ctx["at"]] if ctx.get("at") else [])) or None
        if nested["type"] == "spec":
            raise refuse(at, str(ctx["rule"]), ctx.get("got"), str(ctx["fix"]).replace("{field}", at or "")) from None
        if nested["type"] == "missing":
            raise refuse(at, "is required", None, f"add `{at}:` (epochs)") from None
        raise refuse(at, nested["msg"], nested.get("input"), _SCHEDULER_FIX) from None


def _no_pruner(raw: Any) -> bool:
    """``pruner:`` absent or written as no pruner (null, none, NopPruner), as beside a scheduler."""
    nop = ("none", "nop", "noppruner", "optuna.pruners.noppruner")
    if isinstance(raw, Component):
        return raw.name.lower() in nop and not raw.kwargs
    if isinstance(raw, Mapping):
        return set(raw) == {"name"} and isinstance(raw["name"], str) and raw["name"].lower() in nop
    return raw is None or (isinstance(raw, str) and raw.lower() in nop)


def _storage_url(url: str) -> str:
    from lightstudy.errors import StorageError
    from lightstudy.storage import check_url, redact

    try:
        check_url(url)
    except StorageError as e:
        raise refuse(None, e.message.split(": ", 1)[-1], redact(url), e.fix or "") from e
    return url


@dataclass(frozen=True, config=CONFIG)
class StudySettings:
    """The ``study:`` block."""

    name: Annotated[
        str,
        Strict(),
        StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"),
        rule("must be 1-100 letters, digits, '_', '.' or '-' (it names the run folder)", "e.g. name: digits"),
    ]
    directions: Annotated[
        tuple[Direction, ...],
        MinLen(1),
        rule("must be minimize or maximize", "write direction: maximize (or directions: [maximize, minimize])"),
    ] = ("maximize",)
    metrics: Annotated[
        tuple[Metric, ...],
        MinLen(1),
        rule("must name a metric the LightningModule logs", "e.g. metric: val_acc (or metrics: [val_acc, val_loss])"),
    ] = ("val_acc",)
    # SQLAlchemy URL; None: LIGHTSTUDY_STORAGE or the run folder's SQLite
    storage: (
        Annotated[
            str,
            Strict(),
            rule("must be a SQLAlchemy URL", "e.g. storage: sqlite:///runs/x/study.db"),
            AfterValidator(_storage_url),
        ]
        | None
    ) = None
    # the workers' database sessions: {synchronous_commit: off} trades the last commits for speed
    storage_options: Annotated[StorageOptions, BeforeValidator(lambda v: {} if v is None else v)] = StorageOptions()
    n_trials: Positive | None = None  # study-wide, across all workers and machines
    timeout: Seconds | None = None  # seconds from the study's first trial, study-wide
    seed: (
        Annotated[
            int,
            Strict(),
            Ge(0),
            Le(2**32 - 1),  # numpy's (and so every Optuna sampler's) seed range
            rule("must be an integer >= 0 or null, at most 2**32 - 1", "set seed: 0 (or null for a random seed)"),
        ]
        | None
    ) = 0  # base of every trial's seed and of the sampler's
    sampler: Sampler = Component("TPESampler")
    pruner: Pruner = Component("MedianPruner")
    # promotes (ASHA) or forks (PBT) trials from checkpoints; excludes pruner (validate only, for now)
    scheduler: Annotated[SchedulerSettings | None, BeforeValidator(_scheduler_form)] = None
    checkpoints: Annotated[CheckpointSettings, BeforeValidator(lambda v: {} if v is None else v)] = CheckpointSettings()
    run_dir: Annotated[str, Strict(), rule("must be a folder path", "e.g. run_dir: runs/digits")] | None = None
    trial_timeout: Seconds | None = None  # seconds one trial may run before it is failed
    max_retry: Count = 2  # retries of a trial whose worker or process died
    heartbeat_interval: Annotated[Positive, BeforeValidator(lambda v: 10 if v is None else v)] = 10  # seconds
    grace_period: Annotated[Positive, BeforeValidator(lambda v: 60 if v is None else v)] = 60  # s without a beat: dead
    # parameter sets to evaluate first (Optuna's enqueue_trial)
    enqueue: Annotated[
        tuple[Annotated[Mapping[str, Any], MinLen(1)], ...],
        BeforeValidator(lambda v: () if v is None else v),
        rule(
            "must be a list of parameter sets (search-space path: value)",
            "e.g. enqueue: [{model.init_args.lr: 0.01, data.init_args.batch_size: 64}]",
        ),
    ] = ()

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def direction(self) -> str:
        return self.directions[0]

    @property
    def is_multi_objective(self) -> bool:
        return len(self.directions) > 1

    @validator(mode="before")
    @classmethod
    def _one_objective_form(cls, data: Any) -> Any:
        """``direction``/``metric`` (one objective) or ``directions``/``metrics`` (several), not both."""
        data = known_keys(
            data,
            cls,
            what="must be a mapping",
            fix="write `study: {name: my-study, ...}`",
            also=("direction", "metric"),
            noun="the study block",
        )
        if not isinstance(data, Mapping):
            return data
        for one, many in (("direction", "directions"), ("metric", "metrics")):
            if one in data and many in data:
                raise refuse(many, f"cannot be given with study.{one}", data[many], f"keep one: {one} or {many}")
        out = {k: v for k, v in data.items() if k not in ("direction", "metric")}
        if data.get("scheduler") is not None:
            if not _no_pruner(data.get("pruner")):
                raise refuse(
                    "scheduler",
                    "cannot be given with study.pruner (the scheduler decides which trials stop)",
                    data["scheduler"],
                    "keep one: remove pruner:, or remove scheduler:",
                )
            out["pruner"] = None  # NopPruner: promotions replace pruning
        if "directions" not in data:
            out["directions"] = [data.get("direction", "maximize")]
        if "metrics" not in data:
            out["metrics"] = [data.get("metric")]
        return out

    @validator(mode="after")
    def _consistent(self) -> StudySettings:
        d_key, m_key = "directions", "metrics"  # parse_study names them as the user wrote them
        if len(self.directions) != len(self.metrics):
            raise refuse(
                d_key,
                f"needs one direction per metric ({len(self.metrics)} metrics)",
                list(self.directions),
                "give as many directions as metrics",
            )
        if len(set(self.metrics)) != len(self.metrics):
            raise refuse(m_key, "must not repeat a metric", list(self.metrics), "list each metric once")
        for d, m in zip(self.directions, self.metrics):
            words = set(re.split(r"[^a-z0-9]+", m.lower()))
            if d == "maximize" and words & _LOWER_IS_BETTER:
                raise refuse(
                    d_key,
                    f"maximize contradicts metric {m!r}, where lower is better",
                    d,
                    f"set minimize for {m}, or name a higher-is-better metric",
                )
            if d == "minimize" and words & _HIGHER_IS_BETTER and not words & _LOWER_IS_BETTER:
                raise refuse(
                    d_key,
                    f"minimize contradicts metric {m!r}, where higher is better",
                    d,
                    f"set maximize for {m}, or name a lower-is-better metric",
                )
        if self.scheduler is not None and self.is_multi_objective:
            raise refuse(
                "scheduler",
                "ranks trials on one objective, but the study has several",
                self.scheduler.name,
                "keep one metric, or remove scheduler:",
            )
        pbt = self.scheduler if isinstance(self.scheduler, PbtSettings) else None
        if pbt is not None and self.n_trials is not None and self.n_trials < pbt.population:
            raise refuse(
                "n_trials",
                f"must be at least scheduler.population ({pbt.population}): PBT samples that many",
                self.n_trials,
                f"set n_trials: {pbt.population} or more, or a smaller population",
            )
        if self.n_trials is None and self.timeout is None and not isinstance(self.scheduler, PbtSettings):
            raise refuse(
                "n_trials", "a study needs a budget: n_trials or timeout (or both)", None, "set e.g. n_trials: 40"
            )
        if self.grace_period <= self.heartbeat_interval:
            raise refuse(
                "grace_period",
                "must be longer than heartbeat_interval",
                self.grace_period,
                f"set grace_period to at least {2 * self.heartbeat_interval}",
            )
        return self


_STUDY = TypeAdapter(StudySettings)


def parse_study(source: str, raw: Any) -> StudySettings:
    """Validate the ``study:`` block.

    Raises:
        SpecError: naming ``study.<key>``, the rule, the value and the fix.
    """
    try:
        return _STUDY.validate_python(raw)
    except ValidationError as e:
        written = raw if isinstance(raw, Mapping) else {}
        rename = {
            many: one for one, many in (("direction", "directions"), ("metric", "metrics")) if many not in written
        }
        raise spec_error(source, "study", e, rename={**rename, "kwargs": "init_args"}) from e


def parse_component(source: str, key: str, raw: Any, *, allow_none: bool) -> Component:
    """A sampler (``allow_none=False``) or pruner (``None`` is NopPruner) in any of its forms."""
    try:
        return TypeAdapter(Pruner if allow_none else Sampler).validate_python(raw)
    except ValidationError as e:
        raise spec_error(source, key, e, rename={"kwargs": "init_args"}) from e
