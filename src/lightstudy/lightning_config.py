"""LightningCLI glue: a config dict becomes a checked, instantiated model, data module and Trainer.

Parsing and instantiation go through ``LightningCLI`` itself (``run=False``), so every
``class_path``/``init_args`` rule, type check, ``optimizer:``/``lr_scheduler:`` section and
``save_hyperparameters`` behaviour is exactly LightningCLI's, and a resolved config that
lightstudy writes out trains with a plain ``LightningCLI`` script. A module subclassing
``pytorch_lightning.LightningModule`` is run by ``pytorch_lightning``'s LightningCLI and Trainer,
one subclassing ``lightning.pytorch.LightningModule`` by ``lightning.pytorch``'s.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from lightstudy.errors import SpecError
from lightstudy.search_space import apply_params, assignment
from lightstudy.spec import CLASS_SECTIONS, StudySpec

__all__ = [
    "VERBOSE_VAR",
    "Built",
    "build",
    "check_spec",
    "cli_class",
    "import_class",
    "lightning_namespace",
    "parse_config",
    "quiet_lightning",
]

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
VERBOSE_VAR = "LIGHTSTUDY_VERBOSE"  # "1" (set by `lightstudy --verbose`, inherited by children)
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def quiet_lightning(verbose: bool | None = None) -> None:
    """Lightning's output as a lightstudy user needs it: each line once, and only its warnings.

    Lightning adds stream handlers of its own when imported (``lightning`` always, its
    subpackages when the root logger has none), so beside the root logger's handler every
    record shows twice. Where the root logger has a handler (the CLI's), Lightning's own are
    removed and its records propagate to it, once. Not verbose (``verbose`` None reads
    ``$LIGHTSTUDY_VERBOSE``): its INFO lines ("Seed set to", "GPU available", tips) and its
    deprecation, future and "possible user" warnings are hidden; other warnings still show.
    Imports Lightning: call it where Lightning is about to be used.
    """
    import logging
    import os
    import warnings

    if verbose is None:
        verbose = os.environ.get(VERBOSE_VAR, "") not in ("", "0")
    for namespace in ("lightning", *NAMESPACES):
        with contextlib.suppress(ImportError):
            importlib.import_module(namespace)
    root_handled = bool(logging.getLogger().handlers)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if root_handled:
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # Lightning's own, not a user's FileHandler
                    logger.removeHandler(handler)
            logger.propagate = True
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for module in ("lightning.fabric.utilities.warnings", "lightning_fabric.utilities.warnings"):
        with contextlib.suppress(ImportError):
            warnings.filterwarnings("ignore", category=importlib.import_module(module).PossibleUserWarning)


@dataclass
class Built:
    """What LightningCLI instantiated for one trial."""

    model: Any
    datamodule: Any
    trainer: Any
    config: dict[str, Any]  # the fully resolved config, as `LightningCLI fit --config` reads it
    namespace: str


def import_class(path: str) -> type:
    """Import ``package.module.Class``.

    Raises:
        ImportError: the module or the attribute is missing (message says which).
    """
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"{path!r} is not a dotted path (package.module.Class)")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from e


def pl_module(namespace: str) -> ModuleType:
    """``lightning.pytorch`` or ``pytorch_lightning``, imported."""
    return importlib.import_module(namespace)


def _namespace_of(cls: type, base_name: str) -> str | None:
    for ns in NAMESPACES:
        if issubclass(cls, getattr(pl_module(ns), base_name)):
            return ns
    return None


def lightning_namespace(config: Mapping[str, Any], source: str = "<spec>") -> str:
    """The Lightning namespace the config's model (and data module) subclass.

    Raises:
        SpecError: a class does not import, is not a LightningModule/LightningDataModule, or the
            two come from different namespaces.
    """
    namespaces = {}
    for section, base in (("model", "LightningModule"), ("data", "LightningDataModule")):
        if section not in config:
            continue
        path = config[section]["class_path"]
        cls = _import_for_spec(source, f"{section}.class_path", path)
        ns = _namespace_of(cls, base) if inspect.isclass(cls) else None
        if ns is None:
            raise SpecError(
                source,
                f"{section}.class_path",
                f"must name a {base} subclass",
                path,
                fix=f"subclass lightning.pytorch.{base} (or pytorch_lightning.{base})",
            )
        namespaces[section] = ns
    if len(set(namespaces.values())) > 1:
        raise SpecError(
            source,
            "data.class_path",
            f"is a {namespaces['data']} class but the model is a {namespaces['model']} one",
            config["data"]["class_path"],
            fix="use model and data module from the same namespace (lightning.pytorch or pytorch_lightning)",
        )
    return namespaces["model"]


def _import_for_spec(source: str, key: str, path: str) -> type:
    try:
        return import_class(path)
    except ImportError as e:
        from lightstudy.project import searched

        raise SpecError(
            source,
            key,
            f"does not import ({e}; looked in {searched()})",
            path,
            fix="check the spelling; run lightstudy from the project folder, or install the package, "
            "or add its folder to PYTHONPATH",
        ) from e
    except Exception as e:  # the user's module raised while importing
        raise SpecError(
            source,
            key,
            f"raised {type(e).__name__} while importing: {e}",
            path,
            fix="fix the module so that it imports",
        ) from e


def cli_class(namespace: str, path: str | None = None, source: str = "<spec>") -> type:
    """The LightningCLI class trials parse through: the study's ``cli:`` subclass, else the namespace's.

    Raises:
        SpecError: ``cli:`` does not import, or is not a LightningCLI of the model's namespace.
    """
    base = importlib.import_module(f"{namespace}.cli").LightningCLI
    if path is None:
        return base
    cls = _import_for_spec(source, "cli", path)
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise SpecError(
            source,
            "cli",
            f"must name a subclass of {namespace}.cli.LightningCLI (the model's namespace)",
            path,
            fix=f"subclass {namespace}.cli.LightningCLI",
        )
    return cls


@functools.cache
def _cli_classes(namespace: str, cli: str | None = None) -> tuple[type, type]:
    """(the LightningCLI class, one of it that parses but instantiates nothing)."""
    base = cli_class(namespace, cli)

    class ParseOnlyCLI(base):  # type: ignore[misc, valid-type]
        def instantiate_classes(self) -> None:
            pass

    return base, ParseOnlyCLI


@functools.cache
def _reusing_cli(namespace: str, cli: str | None = None) -> type:
    """A LightningCLI (the study's ``cli:`` subclass, if any) that builds its argument parser once
    per process and reuses it.

    Building the parser (every Trainer, LightningModule and LightningDataModule argument, from
    their signatures) is a quarter of what LightningCLI costs a trial; the warm process builds
    it (:func:`warm_parser`), and every trial process forked from it only parses and
    instantiates. The parser does not depend on the trial: callbacks are added at instantiation
    and the seed is passed in the config (``seed_everything``), never as parser defaults.
    """
    base, _ = _cli_classes(namespace, cli)

    class ReusingCLI(base):  # type: ignore[misc, valid-type]
        _reused_parser: Any = None  # on this class, also when a subclass built it (warm_parser)

        def setup_parser(self, add_subcommands: bool, main_kwargs: Any, subparser_kwargs: Any) -> None:
            if add_subcommands or ReusingCLI._reused_parser is None:
                super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
                if not add_subcommands:
                    ReusingCLI._reused_parser = self.parser  # type: ignore[has-type]
            else:
                self.parser = ReusingCLI._reused_parser

        def instantiate_classes(self) -> None:
            # LightningCLI dumps the parsed config once (its `config_dump`, kept for the
            # hyperparameters `save_hyperparameters` records) when the model is instantiated,
            # validating it again and reading the YAML back in pure Python: 50 ms a trial. The
            # same dump made here, of the config the instantiation reads, skips both (and a
            # parse-only subclass, which instantiates nothing, dumps nothing).
            if "subcommand" not in self.config and not hasattr(self, "config_dump"):
                self.config_dump = dump_config(self.parser, self.config, skip_none=False)
            super().instantiate_classes()

    return ReusingCLI


def dump_config(parser: Any, config: Any, *, skip_none: bool = True) -> dict[str, Any]:
    """``parser.dump(config, skip_link_targets=False)`` read back as a dict, for a ``config`` the
    parser made (``parse_object``): the dump's validation is skipped (the parse validated it) and
    the YAML is read with libyaml where PyYAML has it. The same dict, in a third of the time."""
    import yaml

    options = {} if skip_none else {"skip_none": False}  # True is the default (named so only where False)
    text = parser.dump(config, skip_link_targets=False, skip_validation=True, **options)
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # a safe loader, C or not


def warm_parser(config: Mapping[str, Any], cli: str | None = None) -> None:
    """Build (and keep) the parser :func:`build` reuses for this config's namespace and ``cli``,
    parsing ``config`` once and instantiating nothing: the warm process does it for its trials."""
    namespace = lightning_namespace(config)

    class ParseOnly(_reusing_cli(namespace, cli)):  # type: ignore[misc]
        def instantiate_classes(self) -> None:
            pass

    with _quiet(), _own_argv():
        ParseOnly(
            args=dict(config),
            run=False,
            save_config_callback=None,
            seed_everything_default=False,
            parser_kwargs={"exit_on_error": False},
        )


@contextlib.contextmanager
def _own_argv() -> Iterator[None]:
    """LightningCLI warns when ``args`` is given while sys.argv has flags (the worker's own)."""
    import sys

    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """LightningCLI prints ("Seed set to ...") and warns; a validation should not."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text if len(text) < 400 else text[:397] + "..."


def parse_config(config: Mapping[str, Any], namespace: str, cli: str | None = None) -> Any:
    """Parse a config with LightningCLI's parser (or the ``cli`` subclass's: its arguments and
    links apply), without instantiating; returns the CLI object.

    Raises:
        ValueError: with jsonargparse's explanation in one line.
    """
    _, parse_only = _cli_classes(namespace, cli)
    try:
        with _quiet(), _own_argv():
            return parse_only(
                args=dict(config),
                run=False,
                save_config_callback=None,
                seed_everything_default=False,
                parser_kwargs={"exit_on_error": False},
            )
    except (Exception, SystemExit) as e:
        raise ValueError(_one_line(e)) from e


def check_spec(spec: StudySpec) -> None:
    """Everything :func:`lightstudy.spec.load_spec` cannot check without importing user code.

    Imports the model and data classes, checks their ``init_args`` and the Trainer's arguments
    against the signatures, builds the sampler and pruner, and parses the config with
    LightningCLI once for each bound of every searched parameter, so a search-space path or
    value the class does not take fails here, not in the middle of a study.

    Raises:
        SpecError: naming the file, the key, the rule, the value and the fix.
    """
    from lightstudy.components import check_components

    source = spec.source
    config = spec.lightning_config()
    check_components(spec)
    namespace = lightning_namespace(config, source)
    cli_class(namespace, spec.cli, source)
    for section in CLASS_SECTIONS:
        value = config.get(section)
        if isinstance(value, Mapping) and section in ("model", "data"):
            _check_init_args(source, section, value)
    trainer_cls = pl_module(namespace).Trainer
    for arg in config.get("trainer", {}):
        _check_trainer_arg(source, f"trainer.{arg}", arg, trainer_cls)
    for param in spec.search_space:
        head, *rest = param.path.split(".")
        if head == "trainer":
            _check_trainer_arg(source, f'search_space["{param.path}"]', rest[0], trainer_cls)
        elif head in CLASS_SECTIONS and rest[0] == "init_args" and isinstance(config.get(head), Mapping):
            # The class the argument goes to: the one its conditions select, else the config's.
            class_path = assignment(spec.search_space, {param.path: param.candidates()[0]}).get(
                f"{head}.class_path", config[head]["class_path"]
            )
            cls = _import_for_spec(source, f'search_space["{head}.class_path"]', class_path)
            _check_arg_names(source, f'search_space["{param.path}"]', cls, [rest[1]], class_path)
    try:
        cli = parse_config(config, namespace, spec.cli)
    except ValueError as e:
        key, reason = _explain(str(e))
        raise SpecError(
            source,
            key or "config",
            f"LightningCLI rejects it: {reason}",
            fix="give a value of the type the class argument declares",
        ) from e
    for param in spec.search_space:
        for value in param.candidates():
            candidate = apply_params(config, assignment(spec.search_space, {param.path: value}))
            try:
                with _quiet():
                    cli.parser.parse_object(candidate)
            except (Exception, SystemExit) as e:
                raise SpecError(
                    source,
                    f'search_space["{param.path}"]',
                    f"LightningCLI rejects this value: {_explain(_one_line(e))[1]}",
                    value,
                    fix="use values the class accepts; arguments only some choices take go in conditional "
                    "parameters (when:)",
                ) from e


def _explain(text: str) -> tuple[str | None, str]:
    """The config key and the reason inside jsonargparse's nested Union message."""
    import re

    outer = re.match(r'Parser key "([^"]+)"', text)
    inner = re.search(
        r"Problem with given class_path '([^']+)':\s*Parser key \"([^\"]+)\":\s*(.+?)"
        r"(?:\s+- Expected a <class 'NoneType'>.*)?$",
        text,
    )
    if outer and inner:
        return (
            f"{outer.group(1)}.init_args.{inner.group(2)}",
            f"{inner.group(3).strip()} ({inner.group(1)})",
        )
    plain = re.search(
        r"Problem with given class_path '([^']+)':\s*(.+?)(?:\s+- Expected a <class 'NoneType'>.*)?$", text
    )
    if plain:
        return (outer.group(1) if outer else None), f"{plain.group(2).strip()} ({plain.group(1)})"
    if outer:
        return outer.group(1), text[outer.end() :].lstrip(": ")
    return None, text


def _check_init_args(source: str, section: str, value: Mapping[str, Any]) -> None:
    cls = import_class(value["class_path"])
    init_args = value.get("init_args") or {}
    _check_arg_names(source, f"{section}.init_args", cls, list(init_args), value["class_path"])


def _accepted(cls: type) -> tuple[list[str], bool]:
    """The constructor's argument names, and whether it takes ``**kwargs``."""
    params = inspect.signature(cls).parameters.values()
    names = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_arg_names(source: str, key: str, cls: type, given: Sequence[str], path: str) -> None:
    names, takes_kwargs = _accepted(cls)
    if takes_kwargs:
        return
    for arg in given:
        if arg not in names:
            where = key if key.startswith("search_space") else f"{key}.{arg}"
            raise SpecError(source, where, f"is not an argument of {path}", arg, fix="use one of " + ", ".join(names))


def _check_trainer_arg(source: str, key: str, arg: str, trainer_cls: type) -> None:
    names, _ = _accepted(trainer_cls)
    if arg not in names:
        import difflib

        close = difflib.get_close_matches(arg, names, n=1)
        raise SpecError(
            source,
            key,
            "is not an argument of Trainer",
            arg,
            fix=f"did you mean {close[0]!r}?" if close else "see Trainer's arguments",
        )


def build(config: Mapping[str, Any], *, callbacks: Sequence[Any], seed: int | None, cli: str | None = None) -> Built:
    """Instantiate model, data module and Trainer (with ``callbacks`` added) via LightningCLI, or
    via the ``cli`` subclass (a study's ``cli:``), so its arguments and ``link_arguments`` apply.

    ``seed`` goes through LightningCLI's ``seed_everything`` before anything is built. The
    resolved config has the link targets filled in, so a plain LightningCLI trains it.
    """
    namespace = lightning_namespace(config)
    args = dict(config)
    args.setdefault("seed_everything", seed if seed is not None else True)  # a seed in the config wins
    with _own_argv():
        cli_obj = _reusing_cli(namespace, cli)(
            args=args,
            run=False,
            save_config_callback=None,
            trainer_defaults={"callbacks": list(callbacks)},
            parser_kwargs={"exit_on_error": False},
        )
    resolved = dump_config(cli_obj.parser, cli_obj.config)
    return Built(cli_obj.model, cli_obj.datamodule, cli_obj.trainer, resolved, namespace)
