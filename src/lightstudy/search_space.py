"""Search-space parameters: typed Optuna distributions set at dotted paths of a LightningCLI config.

A spec's ``search_space:`` maps a dotted path (``model.init_args.lr``) to a distribution::

    model.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    model.init_args.channels: {type: int, low: 8, high: 64, step: 8}
    data.init_args.batch_size: {type: categorical, choices: [32, 64, 128]}

The Optuna parameter name is the dotted path itself, so the dashboard, ``best`` and the exported
config all speak of the same thing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightstudy.errors import SpecError

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

__all__ = [
    "CategoricalParam",
    "Condition",
    "FloatParam",
    "IntParam",
    "Param",
    "apply_params",
    "assignment",
    "is_active",
    "parse_search_space",
    "suggest_params",
]

CategoricalChoice = None | bool | int | float | str
Condition = tuple[tuple[str, tuple[Any, ...]], ...]  # ((parent path, allowed values), ...)


@dataclass(frozen=True)
class FloatParam:
    """A float drawn from [low, high], on a log scale or a grid of ``step`` if asked."""

    path: str
    low: float
    high: float
    log: bool = False
    step: float | None = None
    when: Condition = ()  # sampled only when these parameters took one of these values

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> float:
        return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)

    def candidates(self) -> tuple[Any, ...]:
        """Values that bound what the config must accept at this path."""
        return (self.low, self.high)

    def contains(self, value: Any) -> bool:
        if not _is_number(value) or not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return abs(k - round(k)) < 1e-8

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "float", "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return _with_when(out, self.when)


@dataclass(frozen=True)
class IntParam:
    """An integer drawn from [low, high] with ``step``, or on a log scale."""

    path: str
    low: int
    high: int
    log: bool = False
    step: int = 1
    when: Condition = ()  # sampled only when these parameters took one of these values

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> int:
        return trial.suggest_int(self.path, self.low, self.high, log=self.log, step=self.step)

    def candidates(self) -> tuple[Any, ...]:
        return (self.low, self.high)

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
            and (value - self.low) % self.step == 0
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "int", "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step != 1:
            out["step"] = self.step
        return _with_when(out, self.when)


@dataclass(frozen=True)
class CategoricalParam:
    """One of a list of choices (None, bool, int, float or str)."""

    path: str
    choices: tuple[CategoricalChoice, ...]
    when: Condition = ()  # sampled only when these parameters took one of these values

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choices)

    def suggest(self, trial: optuna.Trial) -> CategoricalChoice:
        return trial.suggest_categorical(self.path, self.choices)

    def candidates(self) -> tuple[Any, ...]:
        return self.choices

    def to_dict(self) -> dict[str, Any]:
        return _with_when({"type": "categorical", "choices": list(self.choices)}, self.when)

    def contains(self, value: Any) -> bool:
        return any(
            value == c and (type(value) is type(c) or (_is_number(value) and _is_number(c))) for c in self.choices
        )


Param = FloatParam | IntParam | CategoricalParam

_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
}


def parse_search_space(source: str, raw: Any) -> tuple[Param, ...]:
    """Parse the ``search_space:`` block into parameters, checking every rule Optuna would.

    Raises:
        SpecError: naming the parameter, the rule and the value.
    """
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise SpecError(
            source,
            "search_space",
            "must be a mapping of dotted config paths to distributions",
            raw,
            fix="write e.g. `model.init_args.lr: {type: float, low: 1.0e-4, high: 0.1, log: true}`",
        )
    params: list[Param] = []
    for path, dist in raw.items():
        param = _parse_param(source, path, dist)
        if isinstance(dist, Mapping) and "when" in dist:
            param = dataclasses.replace(param, when=_parse_when(source, param.path, dist["when"], params))
        params.append(param)
    return tuple(params)


def _parse_when(source: str, path: str, raw: Any, earlier: list[Param]) -> Condition:
    """``when: {optimizer.class_path: torch.optim.SGD}`` (one value or a list of them; all must hold)."""
    key = f'search_space["{path}"].when'
    if not isinstance(raw, Mapping) or not raw:
        raise SpecError(
            source,
            key,
            "must map earlier parameters to the value(s) that turn this one on",
            raw,
            fix="e.g. when: {optimizer.class_path: torch.optim.SGD}",
        )
    by_path = {p.path: p for p in earlier}
    condition = []
    for parent, values in raw.items():
        if parent not in by_path:
            raise SpecError(
                source,
                key,
                f"names {parent!r}, which is not a parameter listed before {path}",
                parent,
                fix="condition on a search-space parameter above this one",
            )
        allowed = tuple(values) if isinstance(values, list) else (values,)
        if not allowed:
            raise SpecError(source, key, "needs at least one value", values, fix="list the parent values")
        for value in allowed:
            if not by_path[parent].contains(value):
                raise SpecError(
                    source,
                    f"{key}.{parent}",
                    f"{value!r} is a value {parent} can never take",
                    value,
                    fix=f"use values from {parent}'s distribution {by_path[parent].to_dict()}",
                )
        condition.append((parent, allowed))
    return tuple(condition)


def is_active(param: Param, values: Mapping[str, Any]) -> bool:
    """Whether the parameter's conditions hold for the values sampled so far."""
    return all(parent in values and values[parent] in allowed for parent, allowed in param.when)


def assignment(params: Iterable[Param], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A consistent set of values: each active parameter at its override or its first candidate.

    The overrides of a conditional parameter's parents are added first, so the parameter is
    active whenever it is overridden (used to check every branch of a conditional space).
    """
    params = list(params)
    wanted = dict(overrides or {})
    by_path = {p.path: p for p in params}
    pending = list(wanted)
    while pending:
        for parent, allowed in by_path[pending.pop()].when:
            if parent not in wanted:
                wanted[parent] = allowed[0]
                pending.append(parent)
    values: dict[str, Any] = {}
    for param in params:
        if is_active(param, values):
            values[param.path] = wanted.get(param.path, param.candidates()[0])
    return values


def _parse_param(source: str, path: Any, raw: Any) -> Param:
    key = f"search_space[{path!r}]".replace("'", '"')
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise SpecError(
            source,
            "search_space",
            "keys must be dotted config paths such as model.init_args.lr",
            path,
            fix="name the parameter by its path in the config below the study block",
        )
    if not isinstance(raw, Mapping):
        raise SpecError(
            source,
            key,
            "must be a distribution mapping with a `type`",
            raw,
            fix="write e.g. {type: float, low: 0.0, high: 0.5} or {type: categorical, choices: [..]}",
        )
    kind = raw.get("type")
    if kind not in _KEYS:
        raise SpecError(
            source,
            f"{key}.type",
            "must be one of float, int, categorical",
            kind,
            fix="set `type:` to float, int or categorical",
        )
    unknown = sorted(set(raw) - _KEYS[kind])
    if unknown:
        raise SpecError(
            source,
            f"{key}.{unknown[0]}",
            f"is not a key of a {kind} distribution (allowed: {', '.join(sorted(_KEYS[kind]))})",
            raw[unknown[0]],
            fix=f"remove `{unknown[0]}` or use one of the allowed keys",
        )
    if kind == "categorical":
        return _parse_categorical(source, key, path, raw)
    return _parse_numeric(source, key, path, kind, raw)


def _parse_categorical(source: str, key: str, path: str, raw: Mapping[str, Any]) -> Param:
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        raise SpecError(
            source,
            f"{key}.choices",
            "must be a non-empty list",
            choices,
            fix="list the values to try, e.g. choices: [32, 64, 128]",
        )
    for choice in choices:
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise SpecError(
                source,
                f"{key}.choices",
                "each choice must be null, a bool, a number or a string",
                choice,
                fix="use plain values; to choose a class, list class paths as strings",
            )
    seen: list[Any] = []
    for choice in choices:
        if any(type(choice) is type(s) and choice == s for s in seen):
            raise SpecError(
                source,
                f"{key}.choices",
                "must not repeat a value",
                choice,
                fix="list each choice once",
            )
        seen.append(choice)
    return CategoricalParam(path, tuple(choices))


def _with_when(out: dict[str, Any], when: Condition) -> dict[str, Any]:
    if when:
        out["when"] = {parent: list(allowed) if len(allowed) > 1 else allowed[0] for parent, allowed in when}
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_numeric(source: str, key: str, path: str, kind: str, raw: Mapping[str, Any]) -> Param:
    for bound in ("low", "high"):
        value = raw.get(bound)
        ok = isinstance(value, int) and not isinstance(value, bool) if kind == "int" else (_is_number(value))
        if not ok:
            noun = "an integer" if kind == "int" else "a finite number"
            raise SpecError(
                source,
                f"{key}.{bound}",
                f"must be {noun}" + ("" if bound in raw else " (it is required)"),
                value,
                fix=f"set {bound}: to {noun}",
            )
    low, high = raw["low"], raw["high"]
    if low > high:
        raise SpecError(
            source,
            key,
            "`low <= high` must hold",
            {"low": low, "high": high},
            fix="swap low and high",
        )
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(source, f"{key}.log", "must be true or false", log, fix="write log: true")
    step = raw.get("step")
    if kind == "float":
        if step is not None and (not _is_number(step) or step <= 0):
            raise SpecError(source, f"{key}.step", "must be a number > 0", step, fix="remove step or make it > 0")
        if log and step is not None:
            raise SpecError(
                source,
                key,
                "`step` and `log` cannot be used together",
                {"log": log, "step": step},
                fix="drop one of them",
            )
        if log and low <= 0:
            raise SpecError(
                source,
                f"{key}.low",
                "must be > 0 when log is true",
                low,
                fix="raise low above 0, e.g. 1.0e-5",
            )
        return FloatParam(path, float(low), float(high), log, None if step is None else float(step))
    if step is None:
        step = 1
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise SpecError(source, f"{key}.step", "must be an integer >= 1", step, fix="set step to 1 or more")
    if log and step != 1:
        raise SpecError(
            source,
            key,
            "`step` must be 1 when `log` is true",
            {"log": log, "step": step},
            fix="drop step or log",
        )
    if log and low < 1:
        raise SpecError(source, f"{key}.low", "must be >= 1 when log is true", low, fix="raise low to 1 or more")
    return IntParam(path, low, high, log, step)


def check_fixed_params(source: str, key: str, params: Iterable[Param], values: Mapping[str, Any]) -> None:
    """Check a set of fixed values (an enqueued trial): known paths, values their distributions hold,
    and no value for a parameter its conditions switch off.

    Raises:
        SpecError: naming the parameter and the value.
    """
    params = list(params)
    by_path = {p.path: p for p in params}
    for path, value in values.items():
        if path not in by_path:
            raise SpecError(
                source,
                f"{key}.{path}",
                "is not a search-space parameter",
                path,
                fix="use the dotted paths of search_space: " + ", ".join(by_path),
            )
        if not by_path[path].contains(value):
            raise SpecError(
                source,
                f"{key}.{path}",
                f"is outside its distribution {by_path[path].to_dict()}",
                value,
                fix="pick a value the distribution can produce",
            )
        for parent, allowed in by_path[path].when:
            if parent in values and values[parent] not in allowed:
                raise SpecError(
                    source,
                    f"{key}.{path}",
                    f"is switched off: it applies only when {parent} is one of {list(allowed)}",
                    value,
                    fix=f"drop it, or set {parent} to one of {list(allowed)}",
                )


def suggest_params(trial: optuna.Trial, params: Iterable[Param]) -> dict[str, Any]:
    """Ask the trial for every active parameter, in order (a retried trial gets its values back).

    A conditional parameter is asked for only when its parents took one of its ``when`` values.
    """
    values: dict[str, Any] = {}
    for param in params:
        if is_active(param, values):
            values[param.path] = param.suggest(trial)
    return values


def apply_params(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``config`` with each value set at its dotted path.

    Mappings along the way are created (``init_args`` of a class that had none); a numeric part
    indexes a list (``trainer.callbacks.0.init_args.patience``).

    Raises:
        KeyError: a path runs through a value that is neither a mapping nor a list.
    """
    out = copy.deepcopy(dict(config))
    for path, value in values.items():
        node: Any = out
        parts = path.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise KeyError(f"{'.'.join(parts[:i])} is not a mapping")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise KeyError(f"{'.'.join(parts[:-1])} is not a mapping")
    return out
