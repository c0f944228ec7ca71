from __future__ import annotations

import pytest

from conftest import tiny_spec
from lightstudy.errors import SpecError
from lightstudy.lightning_config import build, check_spec, lightning_namespace, parse_config
from lightstudy.spec import spec_from_dict


def test_namespace_follows_the_model_class() -> None:
    assert lightning_namespace(tiny_spec()) == "lightning.pytorch"
    doc = tiny_spec()
    doc["model"]["class_path"] = "lightstudy.examples.classic.ConvNet"
    doc["data"]["class_path"] = "lightstudy.examples.classic.DigitsDataModule"
    assert lightning_namespace(doc) == "pytorch_lightning"


def test_build_instantiates_through_lightning_cli() -> None:
    import lightning.pytorch as lp

    doc = tiny_spec()
    built = build({k: doc[k] for k in ("trainer", "model", "data")}, callbacks=[], seed=3)
    assert isinstance(built.trainer, lp.Trainer)
    assert built.model.hparams["channels"] == 8
    assert built.config["model"]["init_args"]["dropout"] == 0.1  # defaults resolved
    assert built.config["seed_everything"] == 3


def test_optimizer_section_is_searchable_like_any_path() -> None:
    doc = tiny_spec()
    doc["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
    doc["search_space"] = {"optimizer.init_args.momentum": {"type": "float", "low": 0.0, "high": 0.9}}
    check_spec(spec_from_dict(doc))


def test_parse_errors_are_one_line() -> None:
    doc = tiny_spec()
    doc["model"]["init_args"]["channels"] = "wide"
    with pytest.raises(ValueError) as info:
        parse_config({k: doc[k] for k in ("trainer", "model", "data")}, "lightning.pytorch")
    assert "\n" not in str(info.value)


def test_check_spec_reports_the_user_module_raising_on_import(tmp_path, monkeypatch) -> None:
    (tmp_path / "broken_models.py").write_text("raise RuntimeError('import-time failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = tiny_spec()
    doc["model"]["class_path"] = "broken_models.Net"
    with pytest.raises(SpecError, match="raised RuntimeError while importing"):
        check_spec(spec_from_dict(doc))


def test_a_reused_parser_builds_what_a_fresh_lightning_cli_builds() -> None:
    """Trials after the first reuse LightningCLI's parser: their configs, seeds and objects are unchanged."""
    import yaml
    from lightning.pytorch.cli import LightningCLI

    for lr, channels, batch_size, seed in [(0.01, 8, 64, 1), (0.02, 16, 128, 7), (0.005, 4, 32, 3)]:
        doc = tiny_spec()
        doc["model"]["init_args"].update(lr=lr, channels=channels)
        doc["data"]["init_args"]["batch_size"] = batch_size
        doc["trainer"]["logger"] = False
        config = spec_from_dict(doc).lightning_config()
        built = build(config, callbacks=[], seed=seed)
        fresh = LightningCLI(
            args=dict(config),
            run=False,
            save_config_callback=None,
            seed_everything_default=seed,
            parser_kwargs={"exit_on_error": False},
        )
        assert built.config == yaml.safe_load(fresh.parser.dump(fresh.config, skip_link_targets=False))
        assert built.config["seed_everything"] == seed
        assert dict(built.model.hparams) == dict(fresh.model.hparams)
        assert built.datamodule.hparams.batch_size == batch_size


LINKING_CLI = """
from lightning.pytorch.cli import LightningCLI


class LinkingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.init_args.batch_size", "model.init_args.hidden")
"""


def test_a_study_cli_class_parses_and_builds_with_its_links(tmp_path, monkeypatch) -> None:
    """`cli:` makes validate and every build go through the user's LightningCLI subclass."""
    (tmp_path / "my_cli.py").write_text(LINKING_CLI)
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = tiny_spec("linked")
    doc["cli"] = "my_cli.LinkingCLI"
    doc["model"]["init_args"].pop("hidden")
    doc["search_space"] = {"model.init_args.lr": doc["search_space"]["model.init_args.lr"]}
    spec = spec_from_dict(doc)
    check_spec(spec)
    built = build(spec.lightning_config(), callbacks=[], seed=0, cli=spec.cli)
    assert built.model.hparams.hidden == 64  # the data module's batch_size, through the link
    assert built.config["model"]["init_args"]["hidden"] == 64  # the resolved config has it filled in
    plain = build(built.config, callbacks=[], seed=0)  # and a plain LightningCLI builds that
    assert plain.model.hparams.hidden == 64
    # What the user's own LightningCLI makes of the config (its dump, the model's hyperparameters
    # save_hyperparameters records) is what build made of it with its faster dump.
    import yaml
    from my_cli import LinkingCLI

    config = spec.lightning_config()
    config["seed_everything"] = 0
    fresh = LinkingCLI(args=config, run=False, save_config_callback=None, parser_kwargs={"exit_on_error": False})
    assert built.config == yaml.safe_load(fresh.parser.dump(fresh.config, skip_link_targets=False))
    assert dict(built.model.hparams) == dict(fresh.model.hparams)
    assert built.model._hparams_initial == fresh.model._hparams_initial


def test_a_cli_that_is_not_a_lightning_cli_is_refused(tmp_path) -> None:
    doc = tiny_spec("notcli")
    doc["cli"] = "lightstudy.examples.ConvNet"
    with pytest.raises(SpecError, match=r"cli: must name a subclass of lightning\.pytorch\.cli\.LightningCLI"):
        check_spec(spec_from_dict(doc))
    doc["cli"] = "nowhere_at_all.MyCLI"
    with pytest.raises(SpecError, match=r"cli: does not import \(No module named 'nowhere_at_all'; looked in"):
        check_spec(spec_from_dict(doc))


def test_the_warm_processs_parser_is_the_one_every_build_reuses(tmp_path, monkeypatch) -> None:
    """warm_parser (the warm process) builds the parser the trials forked from it reuse, for the
    study's own cli: class too, and what they build is unchanged."""
    from lightstudy.lightning_config import _reusing_cli, warm_parser

    (tmp_path / "warm_cli.py").write_text(LINKING_CLI)
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = tiny_spec("warmed")
    doc["cli"] = "warm_cli.LinkingCLI"
    doc["model"]["init_args"].pop("hidden")
    doc["trainer"]["logger"] = False
    spec = spec_from_dict(doc)
    config = spec.lightning_config()
    reusing = _reusing_cli("lightning.pytorch", spec.cli)
    assert reusing._reused_parser is None  # a cli: class no test built before
    warm_parser(config, spec.cli)
    parser = reusing._reused_parser
    assert parser is not None
    built = build(config, callbacks=[], seed=3, cli=spec.cli)
    assert reusing._reused_parser is parser
    assert built.model.hparams.hidden == 64 and built.config["seed_everything"] == 3
