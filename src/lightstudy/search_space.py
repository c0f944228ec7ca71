"""Search-space parameters: typed Optuna distributions set at dotted paths of a LightningCLI config.

A spec's ``search_space:`` maps a dotted path (``model.init_args.lr``) to a distribution::

    model.init_args.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    model.init_args.channels: {type: int, low: 8, high: 64, step: 8}
    data.init_args.batch_size: {type: categorical, choices: [32, 64, 128]}

The Optuna parameter name is the dotted path itself, so the dashboard, ``best`` and the exported
config all speak of the same thing. Each parameter is a frozen pydantic dataclass (types, keys);
whether its bounds, ``log`` and ``step`` make a distribution is Optuna's to say: the dataclass
builds one, and Optuna's refusal becomes the spec's error.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from annotated_types import MinLen
from pydantic import (
    AllowInfNan,
    BeforeValidator,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)
from pydantic import model_validator as validator
from pydantic.dataclasses import dataclass

from lightstudy.errors import SpecError
from lightstudy.schema import CONFIG, known_keys, refuse, rule, spec_error

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
    "check_fixed_params",
    "is_active",
    "parse_search_space",
    "suggest_params",
]

CategoricalChoice = None | bool | int | float | str
Condition = tuple[tuple[str, tuple[Any, ...]], ...]  # ((parent path, allowed values), ...)

Number = Annotated[float, Strict(), AllowInfNan(False), rule("must be a finite number", "set {field}: to a number")]
Integer = Annotated[int, Strict(), rule("must be an integer", "set {field}: to a whole number")]
Flag = Annotated[bool, Strict(), rule("must be true or false", "write {field}: true")]
Choices = Annotated[
    tuple[StrictBool | StrictInt | StrictFloat | StrictStr | None, ...],
    rule(
        "must be a non-empty list of plain values: null, a bool, a number or a string",
        "list the values to try, e.g. choices: [32, 64, 128]; to choose a class, list class paths",
    ),
]


def _condition_form(raw: Any) -> Any:
    """``{parent: value or [values], ...}`` as the :data:`Condition` it means."""
    if isinstance(raw, Mapping):
        return tuple((parent, tuple(v) if isinstance(v, list) else (v,)) for parent, v in raw.items())
    return raw if isinstance(raw, tuple) else None  # None: refused below, as every other shape


When = Annotated[
    Condition,
    MinLen(1),
    BeforeValidator(_condition_form),
    rule(
        "must map earlier parameters to the value(s) that turn this one on",
        "e.g. when: {optimizer.class_path: torch.optim.SGD}",
    ),
]

# Optuna's distribution rules (its ValueError), worded for the spec: its words -> (key, rule, fix).
# A refusal not listed here still refuses, in Optuna's own words.
_OPTUNA_RULES = {
    "`low <= high`": (None, "`low <= high` must hold", "swap low and high", ("low", "high")),
    "`low > 0`": ("low", "must be > 0 when log is true", "raise low above 0, e.g. 1.0e-5", ()),
    "`low >= 1`": ("low", "must be >= 1 when log is true", "raise low to 1 or more", ()),
    "`step > 0`": ("step", "must be > 0", "remove step or make it > 0", ()),
    "`step` is not supported when `log`": (
        None,
        "`step` and `log` cannot be used together",
        "drop one of them",
        ("log", "step"),
    ),
    "step is 1 when `log`": (None, "`step` must be 1 when `log` is true", "drop step or log", ("log", "step")),
    "`choices` must contain": ("choices", "must be a non-empty list", "list the values to try, e.g. [32, 64, 128]", ()),
}


class _Param:
    """What every parameter shares: its keys, Optuna's verdict on it, and ``when``."""

    path: str
    when: Condition

    @validator(mode="before")
    @classmethod
    def _keys(cls, data: Any, info: ValidationInfo) -> Any:
        kind = cls.__name__.removesuffix("Param").lower()
        fix = "write e.g. {type: float, low: 0.0, high: 0.5} or {type: categorical, choices: [..]}"
        data = known_keys(
            data,
            cls,
            what="must be a distribution mapping with a `type`",
            fix=fix,
            also=("type",),
            hidden=("path",),
            noun=f"a {kind} distribution",
        )
        if isinstance(data, Mapping) and info.context:
            data = {k: v for k, v in data.items() if k != "type"} | {"path": info.context["path"]}
        return data

    @validator(mode="after")
    def _optuna_agrees(self) -> Any:
        try:
            with warnings.catch_warnings():  # Optuna warns when it trims `high` to the step grid
                warnings.simplefilter("ignore")
                self.distribution()
        except ArithmeticError as e:  # Optuna counts a step grid in Decimal: a step far too small overflows it
            raise refuse(
                "step",
                "is too small for the range to count its grid",
                _plain(getattr(self, "step")),  # noqa: B009 (only FloatParam has a float step)
                "raise step, or drop it",
            ) from e
        except ValueError as e:
            for words, (at, ours, fix, shown) in _OPTUNA_RULES.items():
                if words in str(e):
                    got = {k: getattr(self, k) for k in shown} if shown else _plain(getattr(self, at or "path"))
                    raise refuse(at, ours, got, fix) from e
            raise refuse(None, f"Optuna refuses it ({e})", self.to_dict(), "see optuna.distributions") from e
        return self

    def distribution(self) -> BaseDistribution:
        raise NotImplementedError  # each kind builds its Optuna distribution

    def candidates(self) -> tuple[Any, ...]:
        """Values that bound what the config must accept at this path."""
        return (getattr(self, "low"), getattr(self, "high"))  # noqa: B009 (declared by the subclasses)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: ``type`` and every key that is not at its default."""
        out: dict[str, Any] = {"type": type(self).__name__.removesuffix("Param").lower()}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name not in ("path", "when") and (f.default is dataclasses.MISSING or value != f.default):
                out[f.name] = _plain(value)
        return _with_when(out, self.when)


@dataclass(frozen=True, config=CONFIG)
class FloatParam(_Param):
    """A float drawn from [low, high], on a log scale or a grid of ``step`` if asked."""

    path: str
    low: Number
    high: Number
    log: Flag = False
    step: Number | None = None
    when: When = ()  # sampled only when these parameters took one of these values

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import FloatDistribution

        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> float:
        return trial.suggest_float(self.path, self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        if not _is_number(value) or not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return abs(k - round(k)) < 1e-8


@dataclass(frozen=True, config=CONFIG)
class IntParam(_Param):
    """An integer drawn from [low, high] with ``step``, or on a log scale."""

    path: str
    low: Integer
    high: Integer
    log: Flag = False
    step: Integer = 1
    when: When = ()  # sampled only when these parameters took one of these values

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import IntDistribution

        return IntDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> int:
        return trial.suggest_int(self.path, self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and self.low <= value <= self.high
            and (value - self.low) % self.step == 0
        )


@dataclass(frozen=True, config=CONFIG)
class CategoricalParam(_Param):
    """One of a list of choices (None, bool, int, float or str)."""

    path: str
    choices: Choices = ()
    when: When = ()  # sampled only when these parameters took one of these values

    @validator(mode="after")
    def _distinct(self) -> CategoricalParam:
        for i, choice in enumerate(self.choices):  # 1 and 1.0 and True are different choices
            if (type(choice), choice) in {(type(c), c) for c in self.choices[:i]}:
                raise refuse("choices", "must not repeat a value", choice, "list each choice once")
        return self

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choices)

    def suggest(self, trial: optuna.Trial) -> CategoricalChoice:
        return trial.suggest_categorical(self.path, self.choices)

    def candidates(self) -> tuple[Any, ...]:
        return self.choices

    def contains(self, value: Any) -> bool:
        return any(
            value == c and (type(value) is type(c) or (_is_number(value) and _is_number(c))) for c in self.choices
        )


Param = FloatParam | IntParam | CategoricalParam

_KINDS: dict[str, TypeAdapter[Any]] = {
    "float": TypeAdapter(FloatParam),
    "int": TypeAdapter(IntParam),
    "categorical": TypeAdapter(CategoricalParam),
}


def parse_search_space(source: str, raw: Any) -> tuple[Param, ...]:
    """Parse the ``search_space:`` block into parameters, each a distribution Optuna accepts.

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
        if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
            raise SpecError(
                source,
                "search_space",
                "keys must be dotted config paths such as model.init_args.lr",
                path,
                fix="name the parameter by its path in the config below the study block",
            )
        key = f'search_space["{path}"]'
        kind = dist.get("type") if isinstance(dist, Mapping) else "float"  # a non-mapping: float says why
        if not isinstance(kind, str) or kind not in _KINDS:  # `type: []` too
            raise SpecError(
                source,
                f"{key}.type",
                "must be one of float, int, categorical",
                kind,
                fix="set `type:` to float, int or categorical",
            )
        try:
            param = _KINDS[kind].validate_python(dist, context={"path": path})
        except ValidationError as e:
            raise spec_error(source, key, e) from e
        _check_condition(source, key, param, params)
        params.append(param)
    return tuple(params)


def _check_condition(source: str, key: str, param: Param, earlier: list[Param]) -> None:
    """Each parent of ``when`` is an earlier parameter, and each value one it can take."""
    by_path = {p.path: p for p in earlier}
    for parent, allowed in param.when:
        if parent not in by_path:
            raise SpecError(
                source,
                f"{key}.when",
                f"names {parent!r}, which is not a parameter listed before {param.path}",
                parent,
                fix="condition on a search-space parameter above this one",
            )
        if not allowed:
            raise SpecError(source, f"{key}.when", "needs at least one value", [], fix="list the parent values")
        for value in allowed:
            if not by_path[parent].contains(value):
                raise SpecError(
                    source,
                    f"{key}.when.{parent}",
                    f"{value!r} is a value {parent} can never take",
                    value,
                    fix=f"use values from {parent}'s distribution {by_path[parent].to_dict()}",
                )


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


def _with_when(out: dict[str, Any], when: Condition) -> dict[str, Any]:
    if when:
        out["when"] = {parent: list(allowed) if len(allowed) > 1 else allowed[0] for parent, allowed in when}
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # as the YAML wrote it


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
