"""Samplers and pruners from a spec: any ``optuna.samplers``/``optuna.pruners`` class, or a class path."""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightstudy.errors import SpecError

if TYPE_CHECKING:
    import optuna

    from lightstudy.spec import Component, StudySpec

__all__ = ["build_pruner", "build_sampler", "check_components", "grid_size"]

# Samplers whose `seed` only seeds a random stream: lightstudy reseeds them for every claim so
# that workers sharing one study never draw the same numbers. QMC's seed scrambles one shared
# sequence, so it keeps the spec's seed; GridSampler's seed shuffles the grid, whose order every
# claim must share (a point is a position in it), so it keeps it too.
_RESEEDABLE = {
    "TPESampler",
    "RandomSampler",
    "CmaEsSampler",
    "GPSampler",
    "NSGAIISampler",
    "NSGAIIISampler",
    "BruteForceSampler",
}


def _resolve(component: Component, kind: str, source: str) -> type:
    """The class a component names.

    Optuna's ``MedianPruner`` and ``PercentilePruner``, named or given by class path (also when
    nested, as PatientPruner's ``wrapped_pruner``), become lightstudy's cached equivalents
    (:mod:`lightstudy.pruners`): the same arguments and decisions, but a pruning check that does
    not read every finished trial of the study, which Optuna's does on every epoch of every trial
    (tens of milliseconds each at 10,000 trials). A subclass of them is the user's own and is
    kept as it is.
    """
    import optuna

    module = optuna.samplers if kind == "sampler" else optuna.pruners
    base = optuna.samplers.BaseSampler if kind == "sampler" else optuna.pruners.BasePruner
    key = f"study.{kind}"
    name = component.name
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise SpecError(
                source, key, f"class path does not import ({e})", name, fix="check the module and class name"
            ) from e
    else:
        cls = getattr(module, name, None)
        if cls is None:
            known = sorted(n for n in dir(module) if n.endswith(("Sampler", "Pruner")) and not n.startswith("Base"))
            raise SpecError(source, key, f"is not an optuna.{kind}s class", name, fix="use one of " + ", ".join(known))
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise SpecError(
            source,
            key,
            f"must be a subclass of {base.__module__}.{base.__name__}",
            name,
            fix=f"name an Optuna {kind}",
        )
    if kind == "pruner":
        from lightstudy.pruners import cached_equivalent

        cls = cached_equivalent(cls)
    return cls


def _nested(value: Any, key: str, source: str) -> Any:
    """A kwarg that is itself a sampler or pruner (PatientPruner's wrapped_pruner, ...)."""
    if not (isinstance(value, Mapping) and ("name" in value or "class_path" in value)):
        return value
    from lightstudy.study_block import parse_component

    component = parse_component(source, key, value, allow_none=False)
    import optuna

    kind = "pruner" if hasattr(optuna.pruners, component.name.rpartition(".")[2]) else "sampler"
    cls = _resolve(component, kind, source)
    return _instantiate(cls, dict(component.kwargs), key, source)


def _instantiate(cls: type, kwargs: dict[str, Any], key: str, source: str) -> Any:
    from lightstudy.pruners import spec_name

    name = spec_name(cls)  # errors name MedianPruner, not the cached class standing in for it
    kwargs = {k: _nested(v, f"{key}.{k}", source) for k, v in kwargs.items()}
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        raise SpecError(
            source,
            key,
            f"{name} does not accept these arguments ({e})",
            kwargs,
            fix="use its arguments: " + ", ".join(params),
        ) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs)
    except Exception as e:  # the class's own validation (ValueError, TypeError, ...)
        raise SpecError(
            source,
            key,
            f"{name} rejected its arguments: {e}",
            kwargs,
            fix=f"see the {name} documentation",
        ) from e


def build_sampler(spec: StudySpec, *, seed_offset: int | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler; ``seed_offset`` gives each claim its own random stream."""
    component = spec.study.sampler
    cls = _resolve(component, "sampler", spec.source)
    kwargs = dict(component.kwargs)
    if "seed" in inspect.signature(cls).parameters and "seed" not in kwargs:
        kwargs["seed"] = spec.study.seed
    if seed_offset is not None and cls.__name__ in _RESEEDABLE and kwargs.get("seed") is not None:
        kwargs["seed"] = kwargs["seed"] + seed_offset
    if cls.__name__ == "GridSampler" and "search_space" not in kwargs:
        kwargs["search_space"] = _grid(spec)
    return _instantiate(cls, kwargs, "study.sampler", spec.source)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner (NopPruner when it says none)."""
    component = spec.study.pruner
    cls = _resolve(component, "pruner", spec.source)
    return _instantiate(cls, dict(component.kwargs), "study.pruner", spec.source)


def check_components(spec: StudySpec) -> None:
    """Build sampler and pruner once, so a wrong name or argument fails at validate time."""
    build_sampler(spec)
    build_pruner(spec)


def grid_size(spec: StudySpec) -> int | None:
    """Points of a GridSampler study's grid (its ``search_space`` kwarg, else the spec's); None
    for other samplers. A grid study ends when every point has been started once."""
    import math

    import optuna

    component = spec.study.sampler
    cls = _resolve(component, "sampler", spec.source)
    if not issubclass(cls, optuna.samplers.GridSampler):
        return None
    grid = component.kwargs.get("search_space") or _grid(spec)
    return math.prod(len(values) for values in grid.values())


def _grid(spec: StudySpec) -> dict[str, list[Any]]:
    from lightstudy.search_space import CategoricalParam, FloatParam, IntParam

    grid: dict[str, list[Any]] = {}
    for p in spec.search_space:
        if isinstance(p, CategoricalParam):
            grid[p.path] = list(p.choices)
        elif isinstance(p, IntParam):
            grid[p.path] = list(range(p.low, p.high + 1, p.step))
        elif isinstance(p, FloatParam) and p.step is not None:
            n = int(round((p.high - p.low) / p.step))
            grid[p.path] = [p.low + i * p.step for i in range(n + 1)]
        else:
            raise SpecError(
                spec.source,
                f'search_space["{p.path}"]',
                "GridSampler needs a finite grid: a float needs `step`",
                p.to_dict(),
                fix="add step: to the float, or give GridSampler a search_space",
            )
    return grid
