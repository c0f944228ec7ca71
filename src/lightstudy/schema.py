"""How the spec's blocks are declared: pydantic dataclasses whose errors read *where → rule → got → fix*.

A field states its type and constraints with pydantic and wears a :func:`rule` (the sentence a
user reads when the value breaks them); a rule that spans fields raises :func:`refuse` from a
validator. :func:`spec_error` turns pydantic's first error into one :class:`SpecError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ConfigDict, ValidationError, WrapValidator
from pydantic_core import ArgsKwargs, PydanticCustomError

from lightstudy.errors import SpecError, did_you_mean

__all__ = ["CONFIG", "known_keys", "refuse", "rule", "spec_error", "spec_key"]

# Lax on containers (a YAML list fills a tuple field); scalars opt into strictness with Strict()
# so that "3" is not an integer and true is not a number. Values are copied in, never trusted.
CONFIG = ConfigDict(regex_engine="python-re")


def refuse(at: str | None, rule: str, got: Any, fix: str) -> PydanticCustomError:
    """An error for a rule pydantic does not state itself; ``at`` is the key below the current one."""
    return PydanticCustomError("spec", "{rule}", {"rule": rule, "at": at, "got": got, "fix": fix})


def rule(what: str, fix: str) -> WrapValidator:
    """Annotated metadata: any failure of the constraints before it reads ``what`` and ``fix``.

    ``{field}`` in ``fix`` becomes the field's name.
    """

    def check(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError as e:
            nested = e.errors(include_url=False)[0]
            if nested["type"] == "spec":  # a rule further in already said it better
                at = [str(p) for p in nested["loc"]] + ([nested["ctx"]["at"]] if nested["ctx"].get("at") else [])
                raise PydanticCustomError("spec", "{rule}", {**nested["ctx"], "at": ".".join(at) or None}) from None
            got = nested.get("input", value) if nested["loc"] else value  # the item at fault in a list
            raise PydanticCustomError("spec", "{rule}", {"rule": what, "at": None, "got": got, "fix": fix}) from None

    return WrapValidator(check)


def known_keys(
    data: Any,
    cls: type,
    *,
    what: str,
    fix: str,
    also: tuple[str, ...] = (),
    hidden: tuple[str, ...] = (),
    noun: str = "",
) -> Any:
    """Body of a ``mode="before"`` validator: the input is a mapping of ``cls``'s fields (but not
    ``hidden``, which lightstudy fills in) or of ``also``.

    Code that constructs the dataclass itself (``ArgsKwargs``, an instance) passes through.
    """
    if isinstance(data, (ArgsKwargs, cls)):
        return data
    if not isinstance(data, Mapping):
        raise refuse(None, what, data, fix)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in hidden] + list(also)
    for key in data:
        if key not in allowed:
            raise refuse(str(key), f"is not a key of {noun or 'this block'}", data[key], did_you_mean(key, allowed))
    return data


def spec_key(prefix: str, loc: tuple[Any, ...] | list[Any]) -> str:
    """``study`` + ``("checkpoints", "keep")`` → ``study.checkpoints.keep``; list indexes in brackets."""
    return prefix + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def spec_error(
    source: str, prefix: str, error: ValidationError, *, rename: Mapping[str, str] | None = None
) -> SpecError:
    """The first of pydantic's errors as a :class:`SpecError` naming the key below ``prefix``.

    ``rename`` maps a field to the key the user wrote (``directions`` → ``direction``); the
    index into a list the user did not write is dropped with it.
    """
    first = error.errors(include_url=False)[0]
    ctx = first.get("ctx") or {}
    loc = list(first["loc"]) + ([ctx["at"]] if ctx.get("at") else [])
    if rename:  # an index right after a renamed list is into the list the user did not write
        loc = [rename.get(p, p) for i, p in enumerate(loc) if not (isinstance(p, int) and i and loc[i - 1] in rename)]
    key = spec_key(prefix, loc)
    if first["type"] == "spec":
        fix = str(ctx["fix"]).replace("{field}", str(loc[-1]) if loc else prefix)
        return SpecError(source, key, str(ctx["rule"]), ctx.get("got"), fix=fix)
    if first["type"] == "missing":
        return SpecError(source, key, "is required", fix=f"add `{loc[-1]}:`" if loc else None)
    message = first["msg"]  # a constraint without a rule(): pydantic's own words
    return SpecError(source, key, message[:1].lower() + message[1:], first.get("input"), fix="see README, A study file")
