from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO, tiny_spec, write_spec
from lightstudy.cli import main
from lightstudy.errors import SpecError
from lightstudy.search_space import CategoricalParam, FloatParam, IntParam
from lightstudy.spec import load_spec, spec_from_dict, with_overrides

BAD = sorted((Path(__file__).parent / "specs" / "bad").glob("*.yaml"))


def _expected_key(path: Path) -> str:
    match = re.search(r"^# expect: (.+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} lacks an '# expect:' line"
    return match.group(1).strip()


def test_digits_spec_parses_into_frozen_dataclasses() -> None:
    spec = load_spec(REPO / "studies" / "digits.yaml")
    assert spec.study.name == "digits"
    assert spec.study.directions == ("maximize",)
    assert spec.study.metric == "val_acc"
    assert spec.study.checkpoints.keep == 3
    assert 30 <= spec.study.n_trials <= 50
    kinds = {p.path: type(p) for p in spec.search_space}
    assert kinds["model.init_args.lr"] is FloatParam
    assert kinds["model.init_args.channels"] is IntParam
    assert kinds["data.init_args.batch_size"] is CategoricalParam
    lr = next(p for p in spec.search_space if p.path == "model.init_args.lr")
    assert lr.log
    with pytest.raises(AttributeError):
        spec.study.name = "x"  # type: ignore[misc]


def test_round_trip_through_dict_keeps_the_spec() -> None:
    spec = load_spec(REPO / "studies" / "digits.yaml")
    again = spec_from_dict(spec.to_dict(), source=spec.source)
    assert again == spec
    assert again.fingerprint() == spec.fingerprint()


def test_fingerprint_ignores_storage_but_not_the_search() -> None:
    doc = tiny_spec()
    a = spec_from_dict(doc)
    doc["study"]["storage"] = "sqlite:///elsewhere.db"
    assert spec_from_dict(doc).fingerprint() == a.fingerprint()
    doc["trainer"]["max_epochs"] = 5
    assert spec_from_dict(doc).fingerprint() != a.fingerprint()


def test_overrides_replace_file_values_and_are_validated() -> None:
    spec = spec_from_dict(tiny_spec())
    assert with_overrides(spec, n_trials=7).study.n_trials == 7
    assert with_overrides(spec, n_trials=None) is spec
    with pytest.raises(SpecError, match=r"study\.n_trials"):
        with_overrides(spec, n_trials=0)


def test_multi_objective_form() -> None:
    doc = tiny_spec()
    del doc["study"]["direction"], doc["study"]["metric"]
    doc["study"].update(directions=["maximize", "minimize"], metrics=["val_acc", "val_loss"])
    spec = spec_from_dict(doc)
    assert spec.study.is_multi_objective
    assert spec_from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_spec_gives_one_line_error_with_key_and_fix(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["validate", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert str(path) in err or "line" in err
    assert _expected_key(path) in err, err
    assert "fix:" in err, err
    # `run` refuses it the same way, before any database or run folder exists.
    assert main(["run", str(path)]) == 2
    assert not list(tmp_path.rglob("*.db")) and not (tmp_path / "runs").exists()


def test_corpus_is_large_enough() -> None:
    assert len(BAD) >= 25


def test_valid_spec_validates(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_spec(tmp_path / "ok.yaml", tiny_spec())
    assert main(["validate", str(path)]) == 0
    assert "ok" in capsys.readouterr().out


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_says_it_is_empty(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{path}: is empty" in err, err
    assert "None" not in err, err
    assert "fix: start from studies/digits.yaml" in err, err


def test_a_grid_too_large_to_list_is_refused() -> None:
    """GridSampler lists every point: 10**9 of them took the machine's memory instead of an error."""
    doc = tiny_spec(sampler="GridSampler")
    doc["search_space"] = {"model.init_args.channels": {"type": "int", "low": 1, "high": 10**9}}
    with pytest.raises(SpecError, match=r"study\.sampler: GridSampler would list more than 1,000,000 points"):
        spec_from_dict(doc)
    doc["search_space"]["model.init_args.channels"]["high"] = 16
    assert spec_from_dict(doc).study.sampler.name == "GridSampler"


# --- `config:` files and `cli:` (issue 15) ------------------------------------------------------


def _with_config_files(tmp_path: Path) -> tuple[Path, dict]:
    import yaml

    doc = tiny_spec("files")
    (tmp_path / "configs").mkdir()
    base = {
        "seed_everything": 123,  # fit --print_config writes it; the study's seed wins
        "ckpt_path": None,
        "trainer": doc.pop("trainer"),
        "model": doc.pop("model"),
        "data": doc.pop("data"),
    }
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "configs" / "exp.yaml").write_text(
        yaml.safe_dump({"trainer": {"max_epochs": 7}, "model": {"init_args": {"channels": 4}}})
    )
    (tmp_path / "studies").mkdir()
    doc["config"] = ["../configs/base.yaml", "../configs/exp.yaml"]
    return tmp_path / "studies" / "files.yaml", doc


def test_config_files_merge_like_lightningcli_and_inline_keys_win(tmp_path: Path) -> None:
    path, doc = _with_config_files(tmp_path)
    doc["trainer"] = {"max_epochs": 3}
    spec = load_spec(write_spec(path, doc))
    config = spec.lightning_config()
    assert config["trainer"] == {"max_epochs": 3, "accelerator": "cpu", "devices": 1}  # inline over exp over base
    assert config["model"]["init_args"] == {"channels": 4, "hidden": 32}  # exp.yaml over base.yaml, key by key
    assert "seed_everything" not in config and "ckpt_path" not in config
    stored = spec.to_dict()
    assert "config" not in stored  # resolved: a worker elsewhere needs no copy of the files
    assert spec_from_dict(stored).lightning_config() == config


def test_a_config_file_with_another_class_path_starts_the_section_afresh() -> None:
    from lightstudy.spec import merge_configs

    merged = merge_configs(
        [
            {"model": {"class_path": "a.A", "init_args": {"x": 1, "y": 2}}},
            {"model": {"init_args": {"y": 3}}},
            {"model": {"class_path": "b.B", "init_args": {"z": 4}}},
        ]
    )
    assert merged == {"model": {"class_path": "b.B", "init_args": {"z": 4}}}
    assert merge_configs(
        [{"model": {"class_path": "a.A", "init_args": {"x": 1}}}, {"model": {"init_args": {"y": 3}}}]
    ) == {"model": {"class_path": "a.A", "init_args": {"x": 1, "y": 3}}}


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (lambda d: d.update(config=["../configs/missing.yaml"]), "config[0]", "file not found"),
        (lambda d: d.update(config=[]), "config", "a list of them"),
        (lambda d: d.update(config=[3]), "config", "a list of them"),
        (lambda d: d.update(cli="NotDotted"), "cli", "import path of a LightningCLI subclass"),
    ],
)
def test_config_and_cli_refusals_name_the_key(tmp_path: Path, change, key: str, words: str) -> None:
    path, doc = _with_config_files(tmp_path)
    change(doc)
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(path, doc))
    assert f"files.yaml: {key}" in str(info.value) and words in str(info.value)


def test_a_config_file_with_a_ckpt_path_or_a_foreign_key_is_refused(tmp_path: Path) -> None:
    import yaml

    path, doc = _with_config_files(tmp_path)
    (tmp_path / "configs" / "exp.yaml").write_text(yaml.safe_dump({"ckpt_path": "last.ckpt"}))
    with pytest.raises(SpecError, match="ckpt_path: a trial starts from scratch"):
        load_spec(write_spec(path, doc))
    (tmp_path / "configs" / "exp.yaml").write_text(yaml.safe_dump({"fit": {"trainer": {}}}))
    with pytest.raises(SpecError, match=r"exp\.yaml: fit: is not a LightningCLI config key"):
        load_spec(write_spec(path, doc))


def test_cli_is_kept_in_the_stored_spec() -> None:
    doc = tiny_spec("withcli")
    doc["cli"] = "lightning.pytorch.cli.LightningCLI"
    spec = spec_from_dict(doc)
    assert spec.cli == "lightning.pytorch.cli.LightningCLI"
    assert spec_from_dict(spec.to_dict()).cli == spec.cli
    assert spec.fingerprint() != spec_from_dict(tiny_spec("withcli")).fingerprint()
