"""Rules for the LightningCLI part of a spec that hold without importing user code: required
sections, a Trainer that ends, class sections in ``class_path``/``init_args`` form, search-space
paths that lead into the config, and how many processes (devices) one trial runs as.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Strict, TypeAdapter, ValidationError
from pydantic import model_validator as validator
from pydantic.dataclasses import dataclass

from lightstudy.errors import SpecError, did_you_mean
from lightstudy.schema import CONFIG, refuse, rule, spec_error

if TYPE_CHECKING:
    from lightstudy.search_space import Param

__all__ = ["CLASS_SECTIONS", "CONFIG_SECTIONS", "check_config", "check_paths", "trial_world_size"]

CONFIG_SECTIONS = ("trainer", "model", "data", "optimizer", "lr_scheduler")
CLASS_SECTIONS = ("model", "data", "optimizer", "lr_scheduler")


# Strategies whose processes lightstudy launches itself (one per device), as torchrun would.
_EXTERNAL_STRATEGIES = {
    "ddp",
    "fsdp",
    "deepspeed",
    "ddp_find_unused_parameters_true",
    "ddp_find_unused_parameters_false",
}
_EXTERNAL_STRATEGIES |= {f"deepspeed_stage_{stage}" for stage in ("1", "2", "2_offload", "3", "3_offload")}
# Strategies that start their own processes, which lightstudy could then not stop, prune or retry.
_SELF_LAUNCHING = {
    f"ddp_{how}{unused}" for how in ("spawn", "fork", "notebook") for unused in ("", "_find_unused_parameters_true")
}


def trial_world_size(config: Mapping[str, Any], source: str = "<spec>") -> int:
    """Processes one trial runs as: its Trainer's devices when they are several (DDP), else 1.

    Raises:
        SpecError: several devices with a strategy that launches its own processes, an unknown
            device count, or several nodes.
    """
    trainer = config.get("trainer") or {}
    devices = trainer.get("devices", "auto")
    strategy = trainer.get("strategy", "auto")
    name = str(strategy.get("class_path", "")) if isinstance(strategy, Mapping) else str(strategy)
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


def check_config(source: str, config: Mapping[str, Any]) -> None:
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
    for key in trainer:
        if not isinstance(key, str):
            raise SpecError(
                source, f"trainer.{key}", "must be the name of a Trainer argument", key, fix="e.g. max_epochs"
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
        value = config.get(section)
        if section in config and not (isinstance(value, str) and section in ("optimizer", "lr_scheduler")):
            try:  # a bare class name is LightningCLI's shorthand for optimizer: and lr_scheduler:
                _CLASS_SECTION.validate_python(value)
            except ValidationError as e:
                raise spec_error(source, section, e) from e


@dataclass(frozen=True, config=CONFIG)
class _ClassSection:
    """``model:``, ``data:``, ``optimizer:``, ``lr_scheduler:``: a class and its arguments."""

    class_path: Annotated[
        str, Strict(), rule("is required: the class to instantiate", "write class_path: package.module.Class")
    ]
    # LightningCLI itself fails on `init_args: null` (as on a missing class); leave it out instead.
    init_args: Annotated[
        Mapping[str, Any],
        rule("must be a mapping of constructor arguments", "e.g. init_args: {lr: 0.01}, or leave init_args out"),
    ] = dataclasses.field(default_factory=dict)
    dict_kwargs: Any = None

    @validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        form = "write `{class_path: package.module.Class, init_args: {...}}`"
        if not isinstance(data, Mapping) or data.get("class_path") is None:
            got = data.get("class_path") if isinstance(data, Mapping) else data
            raise refuse("class_path", "is required: the class to instantiate", got, form)
        for key in set(data) - {"class_path", "init_args", "dict_kwargs"}:
            raise refuse(
                str(key), "is not allowed here (only class_path, init_args)", data[key], "move it under init_args"
            )
        return data


_CLASS_SECTION = TypeAdapter(_ClassSection)


def check_paths(source: str, params: tuple[Param, ...], config: Mapping[str, Any]) -> None:
    """Each search-space path leads into a section of the config, and none lies inside another."""
    for param in params:
        key, (head, *rest) = f'search_space["{param.path}"]', param.path.split(".")
        if head not in CONFIG_SECTIONS:
            sections = ", ".join(CONFIG_SECTIONS)
            raise SpecError(
                source,
                key,
                f"must start with a config section ({sections})",
                head,
                fix=did_you_mean(head, CONFIG_SECTIONS),
            )
        if head in CLASS_SECTIONS and head not in config:
            raise SpecError(
                source,
                key,
                f"points into `{head}:`, which the config does not have",
                param.path,
                fix=f"add a `{head}:` section with class_path, or fix the path",
            )
        if head in CLASS_SECTIONS and rest != ["class_path"] and (rest[:1] != ["init_args"] or len(rest) < 2):
            arg = ".".join(p for p in rest if p != "init_args") or "lr"
            raise SpecError(
                source,
                key,
                f"must be {head}.init_args.<argument> or {head}.class_path",
                param.path,
                fix=f"write {head}.init_args.{arg}",
            )
        if not rest:
            raise SpecError(
                source, key, "must name a value inside the section", param.path, fix=f"e.g. {head}.max_epochs"
            )
        doc = param.to_dict()  # its declared type: config_rules stays below search_space
        if rest[-1:] == ["class_path"] and not (
            doc["type"] == "categorical" and all(isinstance(c, str) for c in doc.get("choices", ()))
        ):
            fix = "e.g. {type: categorical, choices: [torch.optim.SGD, torch.optim.AdamW]}"
            raise SpecError(source, key, "must choose among class paths (categorical, strings)", doc, fix=fix)
        node: Any = config
        for i, part in enumerate(param.path.split(".")[:-1]):  # apply_params can only walk mappings and lists
            node = node.get(part) if isinstance(node, Mapping) else node[int(part)] if _indexes(node, part) else node
            if node is not None and not isinstance(node, (Mapping, list)):
                at = ".".join(param.path.split(".")[: i + 1])
                raise SpecError(
                    source,
                    key,
                    f"runs through {at}, which is a value, not a mapping",
                    node,
                    fix=f"search {at} itself, or fix the path",
                )
        inside = next((p.path for p in params if param.path.startswith(p.path + ".")), None)
        if inside:
            raise SpecError(source, key, f"lies inside {inside}, also searched", param.path, fix="search one of them")


def _indexes(node: Any, part: str) -> bool:
    return isinstance(node, list) and part.isdigit() and int(part) < len(node)
