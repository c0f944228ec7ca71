"""``lightstudy init``: a starting study file from a LightningCLI config (or from class paths).

The file names the config as ``config:`` (so the researcher's files stay the source of truth),
has a study block with the defaults spelled out, and a search space proposed from the typed
arguments of the model, the optimizer and the data module: floats, ints, bools and ``Literal``
choices that have a default. Learning rates are proposed log-uniform and left active; every
other proposal is written commented out, with the default it was derived from, for the
researcher to keep or drop.
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightstudy.errors import LightstudyError

__all__ = ["Proposal", "proposals", "study_file"]

# Integer arguments that describe the data or the machine, not a choice to tune.
_NOT_TUNED = {
    "num_classes",
    "num_workers",
    "in_channels",
    "out_channels",
    "image_size",
    "input_size",
    "seed",
    "features",
    "samples",
    "num_samples",
    "max_epochs",
    "devices",
}


@dataclass(frozen=True)
class Proposal:
    """One search-space entry: its path, its distribution, and whether it is written active."""

    path: str
    dist: dict[str, Any]
    active: bool
    why: str


def _hints(cls: type) -> dict[str, Any]:
    init: Any = cls.__init__  # type: ignore[misc]
    try:
        return typing.get_type_hints(init)
    except Exception:  # an annotation that does not resolve: read the raw ones
        return dict(getattr(init, "__annotations__", {}))


def _propose(path: str, name: str, hint: Any, default: Any) -> Proposal | None:
    """A distribution around ``default`` for an argument typed ``hint``, or None."""
    lowered = name.lower()
    if typing.get_origin(hint) is typing.Literal:
        choices = list(typing.get_args(hint))
        if len(choices) > 1 and all(isinstance(c, str | int | float | bool) for c in choices):
            return Proposal(path, {"type": "categorical", "choices": choices}, False, f"Literal, default {default!r}")
        return None
    if hint is bool and isinstance(default, bool):
        return Proposal(path, {"type": "categorical", "choices": [True, False]}, False, f"bool, default {default}")
    if hint is float and isinstance(default, int | float) and not isinstance(default, bool):
        default = float(default)
        is_lr = lowered in ("lr", "learning_rate") or lowered.endswith("_lr")
        if is_lr and default > 0:
            return Proposal(
                path,
                {"type": "float", "low": default / 10, "high": min(default * 10, 1.0), "log": True},
                True,
                f"learning rate, default {default:g}: log-uniform over two decades",
            )
        if "dropout" in lowered or lowered.endswith(("_p", "_prob")) or (0.0 <= default < 1.0 and "drop" in lowered):
            return Proposal(
                path, {"type": "float", "low": 0.0, "high": 0.5}, False, f"probability, default {default:g}"
            )
        if "decay" in lowered:
            return Proposal(
                path,
                {"type": "float", "low": 1.0e-6, "high": 1.0e-2, "log": True},
                False,
                f"decay, default {default:g}",
            )
        if default > 0:
            return Proposal(
                path,
                {"type": "float", "low": default / 10, "high": default * 10, "log": True},
                False,
                f"float, default {default:g}",
            )
        return None
    if hint is int and isinstance(default, int) and not isinstance(default, bool):
        if lowered in _NOT_TUNED or default <= 0:
            return None
        if "batch" in lowered:
            choices = sorted({max(1, default // 2), default, default * 2})
            return Proposal(path, {"type": "categorical", "choices": choices}, False, f"batch size, default {default}")
        return Proposal(
            path,
            {"type": "int", "low": max(1, default // 2), "high": default * 2},
            False,
            f"size, default {default}",
        )
    return None


def proposals(config: Mapping[str, Any]) -> list[Proposal]:
    """Search-space proposals from the model, optimizer, lr scheduler and data classes of ``config``.

    Raises:
        LightstudyError: a class path does not import.
    """
    from lightstudy.lightning_config import import_class

    out: list[Proposal] = []
    for section in ("model", "optimizer", "data"):
        value = config.get(section)
        if not isinstance(value, Mapping) or not isinstance(value.get("class_path"), str):
            continue
        try:
            cls = import_class(value["class_path"])
        except ImportError as e:
            from lightstudy.project import searched

            raise LightstudyError(
                f"{section}.class_path {value['class_path']!r} does not import ({e}; looked in {searched()})",
                fix="run lightstudy init from the project folder, or fix the class path",
            ) from e
        given = value.get("init_args") or {}
        hints = _hints(cls)
        for param in inspect.signature(cls).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.name == "self":
                continue
            default = given.get(param.name, param.default)
            if default is inspect.Parameter.empty:
                continue
            proposal = _propose(f"{section}.init_args.{param.name}", param.name, hints.get(param.name), default)
            if proposal is not None:
                out.append(proposal)
    return out


def _flow(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()


def study_file(
    out: Path,
    *,
    configs: Sequence[Path] = (),
    model: str | None = None,
    data: str | None = None,
    cli: str | None = None,
    name: str | None = None,
    metric: str = "val_loss",
    direction: str | None = None,
    n_trials: int = 20,
) -> str:
    """The text of a study file to be written at ``out``.

    Raises:
        LightstudyError: neither configs nor a model class, or a config that does not read.
    """
    import yaml

    from lightstudy.spec import merge_configs

    if not configs and not model:
        raise LightstudyError(
            "init needs a config (--config FILE) or a model class (--model package.module.Class)",
            fix="e.g. lightstudy init --config configs/base.yaml --out study.yaml",
        )
    docs = []
    for path in configs:
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise LightstudyError(
                f"--config {path}: cannot be read ({e})", fix="pass a LightningCLI config file"
            ) from e
        if not isinstance(doc, Mapping):
            raise LightstudyError(f"--config {path}: is not a YAML mapping", fix="pass a LightningCLI config file")
        docs.append({k: v for k, v in doc.items() if k not in ("seed_everything", "ckpt_path")})
    inline: dict[str, Any] = {}
    if model:
        inline["model"] = {"class_path": model}
    if data:
        inline["data"] = {"class_path": data}
    if not configs:
        inline = {"trainer": {"max_epochs": 10}, **inline}
    merged = merge_configs([*docs, inline])
    direction = direction or (
        "minimize" if any(w in metric.lower() for w in ("loss", "err", "mse", "mae")) else "maximize"
    )
    name = name or out.stem
    lines = [
        f"# {out.name}, written by lightstudy init. Check it: lightstudy validate {out}",
        f"# Run it:  lightstudy run {out} --workers 2      (or --gpus auto)",
        "study:",
        f"  name: {name}",
        f"  direction: {direction}",
        f"  metric: {metric}                # a score the model logs with self.log (torchmetrics)",
        f"  n_trials: {n_trials}                   # study-wide, across all workers",
        "  timeout: null                  # seconds, study-wide",
        "  seed: 0",
        "  sampler: {name: TPESampler}     # any optuna.samplers class and its kwargs",
        "  pruner: {name: MedianPruner}    # any optuna.pruners class; null: never prune",
        "  checkpoints: {keep: 3}          # the best trials keep their checkpoint",
        "  # storage: sqlite:///runs/" + name + "/study.db   # default; postgresql+psycopg://... for many machines",
    ]
    found = proposals(merged)
    lines.append("search_space:                    # dotted paths into the config; uncomment what to search")
    if not found:
        lines.append("  {}                             # no typed float/int/bool/Literal argument with a default")
    for p in found:
        entry = f"{p.path}: {_flow(p.dist)}"
        lines.append(f"  {entry if p.active else '# ' + entry}    # {p.why}")
    if cli:
        lines.append(f"cli: {cli}   # every trial parses through it: its arguments and link_arguments apply")
    if configs:
        rel = [os.path.relpath(Path(c).resolve(), out.resolve().parent) for c in configs]
        lines.append(f"config: {_flow(rel)}   # LightningCLI --config files: later ones win")
        lines.append("# trainer: {max_epochs: 10}       # inline keys override the config files")
    else:
        for section, value in merged.items():
            lines.append(yaml.safe_dump({section: value}, sort_keys=False, default_flow_style=None).rstrip())
    return "\n".join(lines) + "\n"
