"""The study spec: one YAML file per study, parsed into frozen dataclasses by :func:`load_spec`.

A spec has a ``study:`` block (how to search), a ``search_space:`` block (what to search) and a
LightningCLI config (``trainer:``, ``model:``, ``data:``, optional ``optimizer:`` and
``lr_scheduler:``) that LightningCLI itself could run. This module puts them together and checks
everything that can be checked without importing user code: the study block's rules are in
:mod:`lightstudy.study_block`, the config's in :mod:`lightstudy.config_rules`, the search space's in
:mod:`lightstudy.search_space`; :func:`lightstudy.lightning_config.check_spec` does the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightstudy.config_rules import CLASS_SECTIONS, CONFIG_SECTIONS, check_config, check_paths, trial_world_size
from lightstudy.errors import SpecError, did_you_mean
from lightstudy.search_space import CategoricalParam, Param, check_fixed_params, parse_search_space
from lightstudy.study_block import CheckpointSettings, Component, StudySettings, parse_study

__all__ = [
    "CLASS_SECTIONS",
    "CONFIG_SECTIONS",
    "CheckpointSettings",
    "Component",
    "StudySettings",
    "StudySpec",
    "load_spec",
    "merge_configs",
    "spec_from_dict",
    "trial_world_size",
    "with_overrides",
]


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec. ``config`` is the LightningCLI config; do not mutate it."""

    source: str
    study: StudySettings
    search_space: tuple[Param, ...]
    config: Mapping[str, Any]  # resolved: the `config:` files merged, the inline sections on top
    cli: str | None = None  # a LightningCLI subclass (package.module.Class) every trial parses through

    def lightning_config(self) -> dict[str, Any]:
        """A fresh copy of the LightningCLI config (``trainer``, ``model``, ``data``, ...)."""
        return copy.deepcopy(dict(self.config))

    @property
    def run_dir(self) -> Path:
        return Path(self.study.run_dir or Path("runs") / self.study.name)

    def to_dict(self, *, with_storage: bool = True) -> dict[str, Any]:
        """The canonical document: ``spec_from_dict(spec.to_dict())`` gives the same spec."""
        s = self.study
        one = not s.is_multi_objective
        study: dict[str, Any] = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
        study.update(
            {"direction": s.direction, "metric": s.metric} if one else {"directions": list(s.directions)},
            metrics=None if one else list(s.metrics),
            storage=s.storage if with_storage else None,
            sampler=s.sampler.to_dict(),
            pruner=s.pruner.to_dict(),
            scheduler=None if s.scheduler is None else s.scheduler.to_dict(),
            checkpoints=s.checkpoints.to_dict(),
            enqueue=[dict(e) for e in s.enqueue],
        )
        if s.storage_options == type(s.storage_options)():  # the default: as specs before the key
            del study["storage_options"]
        else:
            study["storage_options"] = s.storage_options.to_dict()
        if one:
            del study["directions"], study["metrics"]
        return {
            "study": study,
            "search_space": {p.path: p.to_dict() for p in self.search_space},
            **({"cli": self.cli} if self.cli else {}),
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
    if doc is None:  # no document at all (empty, only comments, a bare `---`)
        raise SpecError(source, "", "is empty", fix="start from studies/digits.yaml (a `study:` block and a config)")
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
    allowed = ("study", "search_space", "config", "cli", *CONFIG_SECTIONS)
    for key in doc:
        if key not in allowed:
            fix = did_you_mean(key, allowed)
            if key == "seed_everything":
                fix = "remove it: each trial's seed is derived from study.seed"
            raise SpecError(source, str(key) or '""', "is not a top-level key of a study spec", doc[key], fix=fix)
    if "study" not in doc:
        raise SpecError(source, "study", "is required", fix="add a `study:` block with at least `name:`")
    settings = parse_study(source, doc["study"])
    search_space = parse_search_space(source, doc.get("search_space"))
    cli = _cli_path(source, doc.get("cli"))
    config = merge_configs(
        [*_config_files(source, doc.get("config")), {k: doc[k] for k in CONFIG_SECTIONS if k in doc}]
    )
    check_config(source, config)
    check_paths(source, search_space, config)
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
    _check_grid(source, settings, search_space)
    return StudySpec(source, settings, search_space, config, cli)


# --- `config:` files and `cli:` ----------------------------------------------------------------

# Keys of a LightningCLI config file that a study sets itself: each trial's seed comes from
# study.seed, and a trial starts from scratch (or from its own checkpoint when retried).
_FILE_ONLY_KEYS = ("seed_everything", "ckpt_path")


def _cli_path(source: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or "." not in value.strip(".") or " " in value:
        raise SpecError(
            source,
            "cli",
            "must be the import path of a LightningCLI subclass",
            value,
            fix="e.g. cli: my_project.cli.MyLightningCLI",
        )
    return value


def _config_files(source: str, value: Any) -> list[dict[str, Any]]:
    """The ``config:`` files, read in order (paths relative to the study file's folder)."""
    import yaml

    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise SpecError(
            source,
            "config",
            "must be a LightningCLI config file or a list of them",
            value,
            fix="e.g. config: [configs/base.yaml, configs/exp_small.yaml]",
        )
    folder = Path(source).parent if Path(source).is_file() else Path.cwd()
    docs = []
    for i, name in enumerate(names):
        key = f"config[{i}]"
        path = folder / name
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise SpecError(
                source, key, f"file not found ({path})", name, fix="paths are relative to the study file's folder"
            ) from e
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            reason = " ".join(str(e).split())[:200]
            raise SpecError(
                source, key, f"cannot be read as YAML ({reason})", name, fix="pass a LightningCLI config"
            ) from e
        if doc is None:
            continue
        if not isinstance(doc, Mapping):
            raise SpecError(
                source, key, "must hold a YAML mapping (a LightningCLI config)", name, fix="see fit --print_config"
            )
        for k in doc:
            if k not in (*CONFIG_SECTIONS, *_FILE_ONLY_KEYS):
                raise SpecError(
                    source,
                    f"{key}: {name}: {k}",
                    "is not a LightningCLI config key lightstudy can search",
                    fix=f"keep {', '.join(CONFIG_SECTIONS)} (a `fit --print_config` output works as is)",
                )
        if doc.get("ckpt_path") is not None:
            raise SpecError(
                source, f"{key}: {name}: ckpt_path", "a trial starts from scratch", doc["ckpt_path"], fix="remove it"
            )
        docs.append({k: v for k, v in doc.items() if k in CONFIG_SECTIONS})
    return docs


def merge_configs(configs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """LightningCLI ``--config`` semantics: later configs win, key by key; a section given another
    ``class_path`` starts afresh (the old class's ``init_args`` do not apply to the new one)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged = _merge(merged, copy.deepcopy(dict(config)))
    return merged


def _merge(base: Any, over: Any) -> Any:
    if not isinstance(base, Mapping) or not isinstance(over, Mapping):
        return over
    if "class_path" in over and "class_path" in base and over["class_path"] != base["class_path"]:
        return dict(over)
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if key in base else value
    return out


GRID_LIMIT = 1_000_000  # points; Optuna's GridSampler lists every one of them in memory


def _check_grid(source: str, settings: StudySettings, params: tuple[Param, ...]) -> None:
    """A GridSampler built from the search space (no grid of its own) has a grid that fits in memory."""
    if settings.sampler.name.rpartition(".")[2] != "GridSampler" or "search_space" in settings.sampler.kwargs:
        return
    points = 1
    for p in params:
        if isinstance(p, CategoricalParam):
            points *= len(p.choices)
        elif p.step is None:
            return  # a float without a step has no grid: building the sampler says so
        else:
            points *= int((p.high - p.low) // p.step) + 1
        if points > GRID_LIMIT:
            raise SpecError(
                source,
                "study.sampler",
                f'GridSampler would list more than {GRID_LIMIT:,} points (search_space["{p.path}"] and those above)',
                settings.sampler.name,
                fix="narrow the ranges or raise their step, or use another sampler",
            )


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
