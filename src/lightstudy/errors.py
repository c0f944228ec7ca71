"""The exceptions lightstudy raises; the CLI turns each into one line and exit code 2."""

from __future__ import annotations

from typing import Any

_UNSET: Any = object()


class LightstudyError(Exception):
    """Root of every error lightstudy raises on purpose (bad input, missing study, ...).

    Args:
        message: What went wrong, where, and the value that was wrong.
        fix: How to make it right; shown after the message.
    """

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}; fix: {self.fix}" if self.fix else self.message


class SpecError(LightstudyError):
    """A study spec breaks a rule: names the file, the key, the rule, the value and the fix.

    Reads ``studies/x.yaml: study.n_trials: must be an integer >= 1, but got -3; fix: ...``.
    """

    def __init__(self, source: str, key: str, rule: str, got: Any = _UNSET, *, fix: str | None = None) -> None:
        where = f"{source}: {key}" if key else source
        message = f"{where}: {rule}"
        if got is not _UNSET:
            message += f", but got {_show(got)}"
        super().__init__(message, fix=fix)
        self.source = source
        self.key = key
        self.rule = rule
        self.got = got


class StorageError(LightstudyError):
    """The study database cannot be reached or used (the URL never shows a password)."""


class StudyNotFoundError(LightstudyError):
    """No study of that name in the storage."""


class CheckpointError(LightstudyError):
    """A checkpoint is missing, truncated or not safe to load."""


class TrialError(LightstudyError):
    """A trial cannot run as configured (missing metric, bad config at run time, ...)."""


def error_fields(error: LightstudyError) -> dict[str, Any]:
    """``error`` as JSON-able fields, for another process to raise it again (:func:`error_from`)."""
    fields: dict[str, Any] = {"kind": type(error).__name__, "message": error.message, "fix": error.fix}
    if isinstance(error, SpecError):
        fields.update(source=error.source, key=error.key, rule=error.rule)
    return fields


def error_from(fields: dict[str, Any]) -> LightstudyError:
    """The error :func:`error_fields` described, of its own class (a SpecError stays one), its
    message as it was worded there."""
    kinds = {
        cls.__name__: cls
        for cls in (LightstudyError, SpecError, StorageError, StudyNotFoundError, CheckpointError, TrialError)
    }
    cls = kinds.get(str(fields.get("kind")), LightstudyError)
    error = cls.__new__(cls)
    LightstudyError.__init__(error, str(fields.get("message")), fix=fields.get("fix"))
    if isinstance(error, SpecError):
        error.source, error.key, error.rule = (str(fields.get(k, "")) for k in ("source", "key", "rule"))
        error.got = _UNSET
    return error


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def did_you_mean(word: Any, options: Any) -> str:
    """A fix suggesting the closest of ``options``, or listing them."""
    import difflib

    close = difflib.get_close_matches(str(word), list(options), n=1)
    if close:
        return f"did you mean `{close[0]}`?"
    return "use one of " + ", ".join(str(o) for o in options)
