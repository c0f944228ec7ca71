"""The study spec: one YAML file per study, parsed into frozen dataclasses by :func:`load_spec`.

A spec has a ``study:`` block (how to search), a ``search_space:`` block (what to search) and a
LightningCLI config (``trainer:``, ``model:``, ``data:``, optional ``optimizer:`` and
``lr_scheduler:``) that LightningCLI itself could run. This module checks everything that can be
checked without importing user code; :func:`lightstudy.lightning_config.check_spec` does the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightstudy.errors import SpecError
from lightstudy.search_space import Param, check_fixed_params, parse_search_space

__all__ = [
    "CheckpointSettings",
    "Component",
    "StudySettings",
    "StudySpec",
    "load_spec",
    "spec_from_dict",
    "trial_world_size",
    "with_overrides",
]

CONFIG_SECTIONS = ("trainer", "model", "data", "optimizer", "lr_scheduler")
CLASS_SECTIONS = ("model", "data", "optimizer", "lr_scheduler")
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


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec. ``config`` is the LightningCLI config; do not mutate it."""

    source: str
    study: StudySettings
    search_space: tuple[Param, ...]
    config: Mapping[str, Any]

    def lightning_config(self) -> dict[str, Any]:
        """A fresh copy of the LightningCLI config (``trainer``, ``model``, ``data``, ...)."""
        return copy.deepcopy(dict(self.config))

    @property
    def run_dir(self) -> Path:
        return Path(self.study.run_dir or Path("runs") / self.study.name)

    def to_dict(self, *, with_storage: bool = True) -> dict[str, Any]:
        """The canonical document: ``spec_from_dict(spec.to_dict())`` gives the same spec."""
        s = self.study
        study: dict[str, Any] = {"name": s.name}
        if s.is_multi_objective:
            study["directions"] = list(s.directions)
            study["metrics"] = list(s.metrics)
        else:
            study["direction"] = s.direction
            study["metric"] = s.metric
        study.update(
            storage=s.storage if with_storage else None,
            n_trials=s.n_trials,
            timeout=s.timeout,
            seed=s.seed,
            sampler=s.sampler.to_dict(),
            pruner=s.pruner.to_dict(),
            checkpoints=s.checkpoints.to_dict(),
            run_dir=s.run_dir,
            trial_timeout=s.trial_timeout,
            max_retry=s.max_retry,
            heartbeat_interval=s.heartbeat_interval,
            grace_period=s.grace_period,
            enqueue=[dict(e) for e in s.enqueue],
        )
        return {
            "study": study,
            "search_space": {p.path: p.to_dict() for p in self.search_space},
            **self.lightning_config(),
        }

    def fingerprint(self) -> str:
        """Hash of everything that defines the search (not where it is stored)."""
        doc = self.to_dict(with_storage=False)
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file.

    Raises:
        SpecError: the file is missing, is not YAML, or breaks a rule; the message names the file,
            the key, the rule, the value and the fix.
    """
    import yaml

    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SpecError(source, "", "file not found", fix="check the path; studies live in studies/") from e
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(source, "", f"cannot be read ({e})", fix="pass a readable UTF-8 YAML file") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        # The context mark (where an unclosed bracket opened) is where the fix goes.
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        problem_mark = getattr(e, "problem_mark", None)
        if context and problem_mark is not None:
            problem = f"{context}: {problem} at line {problem_mark.line + 1}"
        raise SpecError(source, where, f"is not valid YAML ({problem})", fix="correct the YAML syntax there") from e
    return spec_from_dict(doc, source=source)


def spec_from_dict(doc: Any, *, source: str = "<spec>") -> StudySpec:
    """Validate a parsed spec document (as in the YAML file) and build the spec."""
    if not isinstance(doc, Mapping):
        raise SpecError(
            source,
            "",
            "must be a YAML mapping with `study:`, `search_space:` and a LightningCLI config",
            doc,
            fix="start from studies/digits.yaml",
        )
    allowed = ("study", "search_space", *CONFIG_SECTIONS)
    for key in doc:
        if key not in allowed:
            fix = _did_you_mean(key, allowed)
            if key == "seed_everything":
                fix = "remove it: each trial's seed is derived from study.seed"
            raise SpecError(source, str(key), "is not a top-level key of a study spec", doc[key], fix=fix)
    if "study" not in doc:
        raise SpecError(source, "study", "is required", fix="add a `study:` block with at least `name:`")
    settings = _parse_study(source, doc["study"])
    search_space = parse_search_space(source, doc.get("search_space"))
    config = {k: copy.deepcopy(doc[k]) for k in CONFIG_SECTIONS if k in doc}
    _check_config(source, config)
    _check_paths(source, search_space, config)
    for i, params in enumerate(settings.enqueue):
        check_fixed_params(source, f"study.enqueue[{i}]", search_space, params)
    if settings.is_multi_objective and settings.pruner.name not in ("NopPruner", "optuna.pruners.NopPruner"):
        raise SpecError(
            source,
            "study.pruner",
            "Optuna cannot prune a study with several objectives",
            settings.pruner.name,
            fix="set pruner: null (several objectives), or keep one metric",
        )
    return StudySpec(source, settings, search_space, config)


def with_overrides(spec: StudySpec, **overrides: Any) -> StudySpec:
    """Apply CLI flags over the file's values (``None`` means "not given") and re-validate.

    Keys are :class:`StudySettings` field names; ``keep`` sets ``checkpoints.keep``.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return spec
    doc = spec.to_dict()
    for key, value in given.items():
        if key == "keep":
            doc["study"]["checkpoints"] = {**doc["study"]["checkpoints"], "keep": value}
        else:
            doc["study"][key] = value
    return spec_from_dict(doc, source=spec.source)


# --- the study block -----------------------------------------------------------------------------

_STUDY_KEYS = {f.name for f in dataclasses.fields(StudySettings)} - {"directions", "metrics"}
_STUDY_KEYS |= {"direction", "directions", "metric", "metrics"}


def _parse_study(source: str, raw: Any) -> StudySettings:
    if not isinstance(raw, Mapping):
        raise SpecError(source, "study", "must be a mapping", raw, fix="write `study: {name: my-study, ...}`")
    for key in raw:
        if key not in _STUDY_KEYS:
            raise SpecError(
                source,
                f"study.{key}",
                "is not a key of the study block",
                raw[key],
                fix=_did_you_mean(key, sorted(_STUDY_KEYS)),
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
        sampler=_parse_component(source, "study.sampler", raw.get("sampler", "TPESampler"), allow_none=False),
        pruner=_parse_component(source, "study.pruner", raw.get("pruner", "MedianPruner"), allow_none=True),
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


def _parse_component(source: str, key: str, raw: Any, *, allow_none: bool) -> Component:
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


# --- the LightningCLI config ---------------------------------------------------------------------


# Strategies whose processes lightstudy launches itself (one per device), as torchrun would.
_EXTERNAL_STRATEGIES = (
    "ddp",
    "ddp_find_unused_parameters_true",
    "ddp_find_unused_parameters_false",
    "fsdp",
    "deepspeed",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
)
_SELF_LAUNCHING = (
    "ddp_spawn",
    "ddp_fork",
    "ddp_notebook",
    "ddp_spawn_find_unused_parameters_true",
    "ddp_fork_find_unused_parameters_true",
    "ddp_notebook_find_unused_parameters_true",
)


def trial_world_size(config: Mapping[str, Any], source: str = "<spec>") -> int:
    """Processes one trial runs as: its Trainer's devices when they are several (DDP), else 1.

    Raises:
        SpecError: several devices with a strategy that launches its own processes, an unknown
            device count, or several nodes.
    """
    trainer = config.get("trainer") or {}
    devices = trainer.get("devices", "auto")
    strategy = trainer.get("strategy", "auto")
    name = strategy.get("class_path", "") if isinstance(strategy, Mapping) else str(strategy)
    if isinstance(devices, list):
        count: int | None = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        count = devices
    elif isinstance(devices, str) and devices.isdigit():
        count = int(devices)
    else:
        count = None  # "auto" or -1: every visible device
    if trainer.get("num_nodes", 1) not in (1, None):
        raise SpecError(
            source,
            "trainer.num_nodes",
            "must be 1: a trial runs on one machine",
            trainer.get("num_nodes"),
            fix="remove num_nodes; use more workers instead",
        )
    distributed = name in _EXTERNAL_STRATEGIES or name.endswith(("DDPStrategy", "FSDPStrategy", "DeepSpeedStrategy"))
    if name in _SELF_LAUNCHING:
        raise SpecError(
            source,
            "trainer.strategy",
            "launches its own processes; lightstudy starts one per device "
            "itself (and can then stop, prune and retry them together)",
            strategy,
            fix="use strategy: ddp",
        )
    if distributed and count is None:
        raise SpecError(
            source,
            "trainer.devices",
            f"must be a number with strategy {name}, so lightstudy knows how many processes a trial runs",
            devices,
            fix="set trainer.devices: 2 (for example)",
        )
    if count is not None and count > 1:
        return count
    return 1


def _check_config(source: str, config: Mapping[str, Any]) -> None:
    if "model" not in config:
        raise SpecError(
            source,
            "model",
            "is required",
            fix="add `model: {class_path: lightstudy.examples.ConvNet, init_args: {...}}`",
        )
    trainer = config.get("trainer", {})
    if not isinstance(trainer, Mapping):
        raise SpecError(
            source,
            "trainer",
            "must be a mapping of Trainer arguments",
            trainer,
            fix="e.g. trainer: {max_epochs: 10}",
        )
    trial_world_size(config, source)
    if not any(trainer.get(k) not in (None, -1) for k in ("max_epochs", "max_steps", "max_time")):
        raise SpecError(
            source,
            "trainer.max_epochs",
            "a trial needs an end: max_epochs, max_steps or max_time",
            trainer.get("max_epochs"),
            fix="set trainer.max_epochs, e.g. 10",
        )
    if trainer.get("enable_checkpointing") is False:
        raise SpecError(
            source,
            "trainer.enable_checkpointing",
            "must stay on: lightstudy keeps the best checkpoints",
            False,
            fix="remove enable_checkpointing, or set study.checkpoints.keep: 0",
        )
    for section in CLASS_SECTIONS:
        if section not in config:
            continue
        value = config[section]
        if isinstance(value, str) and section in ("optimizer", "lr_scheduler"):
            continue  # LightningCLI takes a bare class name here
        if not isinstance(value, Mapping) or not isinstance(value.get("class_path"), str):
            raise SpecError(
                source,
                f"{section}.class_path",
                "is required: the class to instantiate",
                value if not isinstance(value, Mapping) else value.get("class_path"),
                fix=f"write `{section}: {{class_path: package.module.Class, init_args: {{...}}}}`",
            )
        for key in value:
            if key not in ("class_path", "init_args", "dict_kwargs"):
                raise SpecError(
                    source,
                    f"{section}.{key}",
                    "is not allowed here (only class_path, init_args)",
                    value[key],
                    fix=f"move it under {section}.init_args",
                )
        if value.get("init_args") is not None and not isinstance(value["init_args"], Mapping):
            raise SpecError(
                source,
                f"{section}.init_args",
                "must be a mapping of constructor arguments",
                value["init_args"],
                fix="e.g. init_args: {lr: 0.01}",
            )


def _check_paths(source: str, params: tuple[Param, ...], config: Mapping[str, Any]) -> None:
    seen = set()
    for param in params:
        key = f'search_space["{param.path}"]'
        if param.path in seen:
            raise SpecError(source, key, "appears twice", param.path, fix="keep one")
        seen.add(param.path)
        head, *rest = param.path.split(".")
        if head not in CONFIG_SECTIONS:
            raise SpecError(
                source,
                key,
                "must start with a config section (" + ", ".join(CONFIG_SECTIONS) + ")",
                head,
                fix=_did_you_mean(head, CONFIG_SECTIONS),
            )
        if not rest:
            raise SpecError(
                source,
                key,
                "must name a value inside the section",
                param.path,
                fix=f"e.g. {head}.init_args.<argument>",
            )
        if head in CLASS_SECTIONS:
            if head not in config:
                raise SpecError(
                    source,
                    key,
                    f"points into `{head}:`, which the config does not have",
                    param.path,
                    fix=f"add a `{head}:` section with class_path, or fix the path",
                )
            if rest[0] != "init_args" and rest != ["class_path"]:
                raise SpecError(
                    source,
                    key,
                    f"must go through {head}.init_args (or be {head}.class_path)",
                    param.path,
                    fix=f"write {head}.init_args.{'.'.join(rest)}",
                )
            if rest[0] == "init_args" and len(rest) < 2:
                raise SpecError(
                    source,
                    key,
                    "must name an argument under init_args",
                    param.path,
                    fix=f"e.g. {head}.init_args.lr",
                )
    for a in params:
        for b in params:
            if b.path.startswith(a.path + "."):
                raise SpecError(
                    source,
                    f'search_space["{b.path}"]',
                    f"lies inside {a.path}, also searched",
                    b.path,
                    fix="search one of them",
                )


def _did_you_mean(word: Any, options: Any) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    if close:
        return f"did you mean `{close[0]}`?"
    return "use one of " + ", ".join(str(o) for o in options)
