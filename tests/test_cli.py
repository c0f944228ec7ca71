from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import REPO, Dashboard, Finished, cli, run_cli, tiny_spec, write_spec
from lightstudy.cli import app
from lightstudy.spec import spec_from_dict
from lightstudy.study import load_study

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_every_command_has_help_with_an_example() -> None:
    assert {"validate", "create", "run", "worker", "status", "best", "dashboard"} <= set(COMMANDS)
    for name in COMMANDS:
        result = run_cli(name, "--help")
        assert result.returncode == 0, result.stderr
        assert "Example" in result.stdout, name


def test_help_is_instant_and_imports_no_torch() -> None:
    code = (
        "import sys, time; t = time.time(); from lightstudy.cli import main; "
        "sys.argv = ['lightstudy', '--help']\n"
        "try:\n    main(['--help'])\nfinally:\n"
        "    print('TORCH' if 'torch' in sys.modules else 'NOTORCH', time.time() - t, file=sys.stderr)"
    )
    times = []
    for _ in range(3):  # the best of three: a busy machine must not fail the promise of a fast --help
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        tag, seconds = result.stderr.strip().splitlines()[-1].split()
        assert tag == "NOTORCH", "lightstudy --help imported torch"
        times.append(float(seconds))
    assert min(times) < 1.0, times


def test_python_dash_m_and_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("lightstudy ")


def test_a_command_that_imported_torch_runs_atexit_and_skips_the_teardown(tmp_path: Path) -> None:
    """`lightstudy validate` imports torch: its atexit handlers run and its exit code is the
    command's, but the interpreter's teardown (1.3-1.7 s of freeing modules) is skipped: a module
    global's __del__ never runs. A command without torch (--version) exits as usual."""
    import os

    site = tmp_path / "site"
    site.mkdir()
    # A module global is freed when the teardown clears the module's dict (the module's other
    # names may be gone by then: what its __del__ needs, it keeps).
    (site / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "atexit.register(lambda: open(os.environ['MARKS'], 'a').write('atexit\\n'))\n"
        "class _Teardown:\n"
        "    def __del__(self, open=os.open, write=os.write, path=os.environ['MARKS'],\n"
        "                flags=os.O_WRONLY | os.O_CREAT | os.O_APPEND):\n"
        "        write(open(path, flags, 0o644), b'teardown\\n')\n"
        "_kept = _Teardown()\n"
    )
    doc = tiny_spec()
    doc["model"]["class_path"] = "lightstudy.examples.NoSuchNet"  # refused once torch is imported
    spec = write_spec(tmp_path / "bad.yaml", doc)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    for args, code, marks in [(("--version",), 0, "atexit teardown"), (("validate", str(spec)), 2, "atexit")]:
        (tmp_path / "marks").unlink(missing_ok=True)
        result = cli(*args, env={"PYTHONPATH": path, "MARKS": str(tmp_path / "marks")})
        assert result.returncode == code, result.stderr
        assert (tmp_path / "marks").read_text().split() == marks.split(), args
    assert "NoSuchNet" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_errors_are_one_line_exit_2_and_debug_shows_traceback(tmp_path: Path) -> None:
    result = cli("best", "nosuch", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no storage given")
    assert len(result.stderr.strip().splitlines()) == 1
    debug = cli("--debug", "best", "nosuch", cwd=tmp_path)
    assert "Traceback" in debug.stderr


@pytest.mark.slow
def test_tiny_study_end_to_end_with_real_clients(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "tiny.yaml", tiny_spec(n_trials=4, checkpoints={"keep": 2}))
    run = cli("run", str(spec), "--workers", "2", cwd=tmp_path, check=True)
    assert "best trial of tiny" in run.stdout
    url = f"sqlite:///{tmp_path / 'runs' / 'tiny' / 'study.db'}"
    study, _ = load_study(url, "tiny")
    assert len([t for t in study.get_trials() if t.state == TrialState.COMPLETE]) == 4

    # lightstudy's read commands in this process (the script's start-up is test_python_dash_m's).
    status = run_cli("status", "tiny", cwd=tmp_path, check=True)
    assert "4/4 trials done" in status.stdout and "study done" in status.stdout
    listing = run_cli("status", cwd=tmp_path, check=True)
    assert "tiny" in listing.stdout

    best = json.loads(run_cli("best", "tiny", "--format", "json", cwd=tmp_path, check=True).stdout)
    assert best["number"] == study.best_trial.number
    assert best["values"]["val_acc"] == pytest.approx(study.best_value)
    assert (tmp_path / best["checkpoint"]).exists()  # relative to the folder it ran in, or absolute
    assert set(best["params"]) == {"model.init_args.lr", "data.init_args.batch_size"}

    # Optuna's own CLI reads the same database.
    optuna_cli = Path(sys.executable).with_name("optuna")
    trials = subprocess.run(
        [str(optuna_cli), "trials", "--storage", url, "--study-name", "tiny", "-f", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert len(json.loads(trials.stdout)) == 4

    # optuna-dashboard serves it over HTTP on loopback.
    with Dashboard("--storage", url) as dashboard:
        studies = json.loads(dashboard.get("/api/studies"))["study_summaries"]
        assert [s["study_name"] for s in studies] == ["tiny"]
        detail = json.loads(dashboard.get(f"/api/studies/{studies[0]['study_id']}"))
        assert len(detail["trials"]) == 4


def test_create_is_idempotent_and_refuses_a_changed_spec(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "tiny.yaml", tiny_spec())
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_cli("create", str(spec), "--storage", url, check=True)
    run_cli("create", str(spec), "--storage", url, check=True)  # the same spec again: nothing to do
    write_spec(spec, tiny_spec(n_trials=9))
    changed = run_cli("create", str(spec), "--storage", url)
    assert changed.returncode == 2 and "--update-spec" in changed.stderr
    run_cli("create", str(spec), "--storage", url, "--update-spec", check=True)
    assert load_study(url, "tiny")[1].study.n_trials == 9  # the updated spec is the one stored


def test_the_default_study_file_validates() -> None:
    run_cli("validate", str(REPO / "studies" / "digits.yaml"), check=True)


def test_read_commands_find_a_study_in_another_run_folder_with_run_dir(tmp_path: Path) -> None:
    # A spec's run_dir (like `run --run-dir`) puts the database in that folder, not runs/<name>.
    spec = write_spec(tmp_path / "tiny.yaml", tiny_spec(run_dir="elsewhere"))
    run_cli("create", str(spec), cwd=tmp_path, check=True)
    assert (tmp_path / "elsewhere" / "study.db").exists()
    status = run_cli("status", "tiny", "--run-dir", "elsewhere", cwd=tmp_path, check=True)
    assert "0/3 trials done" in status.stdout
    listing = run_cli("status", "--run-dir", "elsewhere", cwd=tmp_path, check=True)
    assert "tiny" in listing.stdout
    # Without the flag the error names where it looked and how to point it at the folder.
    missing = run_cli("status", "tiny", cwd=tmp_path)
    assert missing.returncode == 2
    assert "runs/tiny/study.db" in missing.stderr and "--run-dir" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_status_best_and_report_read_what_run_wrote_with_run_dir(tmp_path: Path) -> None:
    doc = tiny_spec(n_trials=1, max_epochs=1)
    doc["trainer"].update(limit_train_batches=2, limit_val_batches=2)
    spec = write_spec(tmp_path / "tiny.yaml", doc)
    run_cli("run", str(spec), "--workers", "1", "--run-dir", "elsewhere", cwd=tmp_path, check=True)
    assert (tmp_path / "elsewhere" / "study.db").exists()
    assert not (tmp_path / "runs").exists()
    status = run_cli("status", "tiny", "--run-dir", "elsewhere", cwd=tmp_path, check=True)
    assert "1/1 trials done" in status.stdout
    best = run_cli("best", "tiny", "--run-dir", "elsewhere", "--format", "json", cwd=tmp_path, check=True)
    record = json.loads(best.stdout)
    assert record["number"] == 0 and (tmp_path / record["checkpoint"]).exists()
    run_cli("report", "tiny", "--run-dir", "elsewhere", "--out", "r.html", cwd=tmp_path, check=True)
    assert "Study tiny" in (tmp_path / "r.html").read_text()


def test_one_storage_rule_flag_then_environment_then_spec_then_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightstudy.cli.shared import storage_url
    from lightstudy.errors import StorageError

    monkeypatch.chdir(tmp_path)
    flag, env, in_spec = (f"sqlite:///{tmp_path / n}.db" for n in ("flag", "env", "spec"))
    spec = spec_from_dict(tiny_spec(storage=in_spec))
    bare = spec_from_dict(tiny_spec(run_dir="elsewhere"))
    # Commands with a spec file (validate, create, run).
    assert storage_url(None, spec=bare) == "sqlite:///elsewhere/study.db"
    assert storage_url(None, spec=spec) == in_spec
    monkeypatch.setenv("LIGHTSTUDY_STORAGE", env)
    assert storage_url(None, spec=spec) == env
    assert storage_url(flag, spec=spec) == flag
    # Commands that read a study: the run folder's study.db only when it exists.
    assert storage_url(None, study="tiny", run_dir=Path("elsewhere")) == env
    assert storage_url(flag, study="tiny") == flag
    monkeypatch.delenv("LIGHTSTUDY_STORAGE")
    with pytest.raises(StorageError, match=r"no runs/tiny/study\.db here"):
        storage_url(None, study="tiny")
    with pytest.raises(StorageError, match=r"no elsewhere/study\.db here.*--run-dir"):
        storage_url(None, study="tiny", run_dir=Path("elsewhere"))
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "study.db").touch()
    assert storage_url(None, study="tiny") == "sqlite:///runs/tiny/study.db"
    with pytest.raises(StorageError, match="no storage given"):  # the proxy: no spec, no run folder
        storage_url(None)


def test_create_and_status_follow_the_storage_rule(tmp_path: Path) -> None:
    in_spec, env, flag = (f"sqlite:///{tmp_path / n}.db" for n in ("spec", "env", "flag"))
    spec = write_spec(tmp_path / "tiny.yaml", tiny_spec(storage=in_spec))
    run_cli("create", str(spec), cwd=tmp_path, check=True)
    run_cli("create", str(spec), cwd=tmp_path, env={"LIGHTSTUDY_STORAGE": env}, check=True)
    run_cli("create", str(spec), "--storage", flag, cwd=tmp_path, env={"LIGHTSTUDY_STORAGE": env}, check=True)
    assert all((tmp_path / f"{n}.db").exists() for n in ("spec", "env", "flag"))
    status = run_cli("status", "tiny", cwd=tmp_path, env={"LIGHTSTUDY_STORAGE": env}, check=True)
    assert "env.db" in status.stdout
    status = run_cli("status", "tiny", "--storage", flag, cwd=tmp_path, env={"LIGHTSTUDY_STORAGE": env}, check=True)
    assert "flag.db" in status.stdout


def test_test_command_prints_lightning_lines_once_and_only_with_verbose(finished_study: Finished) -> None:
    """Lightning's INFO lines ("Seed set to", "GPU available") showed twice (its own handler beside
    the CLI's) with its deprecation warnings; now: hidden, and once each with --verbose."""
    args = ("test", finished_study.name, "--storage", finished_study.url, "--run-dir", str(finished_study.run_dir))
    quiet = cli(*args, check=True)
    assert "test metrics of finished" in quiet.stdout
    assert "Seed set to" not in quiet.stdout + quiet.stderr
    assert "deprecated" not in quiet.stderr
    loud = cli("--verbose", *args, check=True)
    assert (loud.stdout + loud.stderr).count("GPU available") == 1, loud.stderr


def test_init_refuses_to_overwrite_and_needs_a_config_or_a_model(tmp_path: Path) -> None:
    (tmp_path / "study.yaml").write_text("study: {name: x}\n")
    refused = run_cli("init", "--config", "base.yaml", "--out", "study.yaml", cwd=tmp_path)
    assert refused.returncode == 2 and "study.yaml exists" in refused.stderr
    empty = run_cli("init", "--out", "new.yaml", cwd=tmp_path)
    assert empty.returncode == 2 and "--config FILE" in " ".join(empty.stderr.split())
    assert not (tmp_path / "new.yaml").exists()


def test_init_from_the_bundled_classes_writes_a_file_that_validates(tmp_path: Path) -> None:
    done = run_cli(
        "init",
        "--model",
        "lightstudy.examples.ConvNet",
        "--data",
        "lightstudy.examples.DigitsDataModule",
        "--metric",
        "val_acc",
        "--out",
        "digits.yaml",
        cwd=tmp_path,
        check=True,
    )
    assert "it validates" in done.stdout
    text = (tmp_path / "digits.yaml").read_text()
    assert "  model.init_args.lr: {type: float, low: 0.001, high: 0.1, log: true}" in text
    assert "# model.init_args.dropout: {type: float, low: 0.0, high: 0.5}" in text
    assert "num_classes" not in text.split("search_space:")[1].split("trainer:")[0]
