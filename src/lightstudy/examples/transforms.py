"""Transforms from a spec: per-image ``torchvision.transforms.v2`` lists written the LightningCLI
way (``{class_path, init_args}`` or a bare v2 class name), and MixUp/CutMix batch transforms.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

__all__ = ["BATCH_TRANSFORMS", "batch_transform_parts", "build_batch_transform", "build_transforms"]

# Names `batch_transform` accepts besides a class path; each gets `alpha` and `num_classes`.
BATCH_TRANSFORMS = ("mixup", "cutmix", "mixup_or_cutmix")


def _resolve_class(name: str, where: str) -> type:
    """A bare name is a ``torchvision.transforms.v2`` class; a dotted one is imported."""
    if "." not in name:
        cls = getattr(v2, name, None)
        if inspect.isclass(cls):
            return cls
        known = [n for n in dir(v2) if n[:1].isupper() and inspect.isclass(getattr(v2, n))]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.transforms.v2"
        raise ValueError(
            f"`{where}`: a bare name must be a torchvision.transforms.v2 class, but got {name!r}; "
            f"fix: {hint} (or give a full class_path)"
        )
    module_name, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"`{where}`: class_path must import, but got {name!r} ({e}); "
            "fix: check the spelling, e.g. torchvision.transforms.v2.RandomCrop"
        ) from e
    if not inspect.isclass(cls):
        raise ValueError(f"`{where}`: class_path must name a class, but got {name!r}; fix: name a class")
    return cls


def _spec_parts(spec: Any, where: str) -> tuple[type, dict[str, Any]]:
    """``"Name"`` or ``{class_path: ..., init_args: {...}}`` → (class, keyword arguments)."""
    if isinstance(spec, str):
        return _resolve_class(spec, where), {}
    if isinstance(spec, Mapping) and "class_path" in spec and set(spec) <= {"class_path", "init_args"}:
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise ValueError(
                f"`{where}.init_args` must be a mapping, but got {init_args!r}; fix: write init_args: {{...}}"
            )
        return _resolve_class(str(spec["class_path"]), where), {str(k): v for k, v in init_args.items()}
    raise ValueError(
        f"`{where}` must be a class name or {{class_path: ..., init_args: {{...}}}}, but got {spec!r}; "
        "fix: write e.g. RandomHorizontalFlip or {class_path: RandomCrop, init_args: {size: 32}}"
    )


def _coerce(kwargs: dict[str, Any]) -> dict[str, Any]:
    # YAML cannot spell a torch.dtype, so `dtype: float32` (or torch.float32) names one.
    out = dict(kwargs)
    value = out.get("dtype")
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        out["dtype"] = getattr(torch, value.removeprefix("torch."))
    return out


def _instantiate(cls: type, kwargs: dict[str, Any], where: str) -> Any:
    try:
        return cls(**_coerce(kwargs))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`{where}`: {cls.__name__}(**{kwargs!r}) must be constructible, but it raised "
            f"{type(e).__name__}: {e}; fix: use the arguments of {cls.__module__}.{cls.__name__}"
        ) from e


def build_transforms(specs: Sequence[Any] | None, where: str = "transforms") -> list[Callable[..., Any]]:
    """Instantiate a LightningCLI-style list of transforms.

    Args:
        specs: Items like ``"RandomHorizontalFlip"`` or
            ``{class_path: torchvision.transforms.v2.RandomCrop, init_args: {size: 32, padding: 4}}``.
        where: The argument's name, for error messages.

    Raises:
        ValueError: an item does not name a class or its arguments do not fit.
    """
    if specs is not None and (isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence)):
        raise ValueError(f"`{where}` must be a list of transforms, but got {specs!r}; fix: write it as a YAML list")
    out = []
    for i, spec in enumerate(specs or ()):
        cls, kwargs = _spec_parts(spec, f"{where}[{i}]")
        out.append(_instantiate(cls, kwargs, f"{where}[{i}]"))
    return out


def batch_transform_parts(spec: str | Mapping[str, Any], alpha: float) -> tuple[list[type], dict[str, Any]]:
    if isinstance(spec, str) and spec.lower() in BATCH_TRANSFORMS:
        name = spec.lower()
        classes = {"mixup": [v2.MixUp], "cutmix": [v2.CutMix], "mixup_or_cutmix": [v2.MixUp, v2.CutMix]}
        return classes[name], {"alpha": alpha}
    if isinstance(spec, str) and "." not in spec:
        raise ValueError(
            f"`batch_transform` must be one of {', '.join(BATCH_TRANSFORMS)}, none or a class_path, "
            f"but got {spec!r}; fix: use e.g. batch_transform: mixup"
        )
    cls, kwargs = _spec_parts(spec, "batch_transform")
    return [cls], kwargs


def build_batch_transform(
    spec: str | Mapping[str, Any] | None, num_classes: int, alpha: float = 1.0
) -> Callable[..., Any] | None:
    """MixUp, CutMix or either at random (``mixup_or_cutmix``), or any class path, for whole batches.

    ``num_classes`` is passed when the class takes it and the spec does not set it.

    Raises:
        ValueError: an unknown name, or arguments the class refuses (e.g. ``alpha <= 0``).
    """
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    classes, kwargs = batch_transform_parts(spec, alpha)
    built = []
    for cls in classes:
        args = dict(kwargs)
        if "num_classes" in inspect.signature(cls).parameters:
            args.setdefault("num_classes", num_classes)
        built.append(_instantiate(cls, args, "batch_transform"))
    return built[0] if len(built) == 1 else v2.RandomChoice(built)
