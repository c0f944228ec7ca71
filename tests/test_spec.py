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
