"""Shared fixtures: tiny studies on the bundled digits data, temporary storages, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PG_BASE = os.environ.get("LIGHTSTUDY_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


def tiny_spec(name: str = "tiny", *, n_trials: int = 3, max_epochs: int = 2, **study: Any) -> dict[str, Any]:
    """A study document that trains in about a second a trial on CPU."""
    doc: dict[str, Any] = {
        "study": {
            "name": name,
            "direction": "maximize",
            "metric": "val_acc",
            "n_trials": n_trials,
            "seed": 0,
            "sampler": {"name": "RandomSampler"},
            "pruner": None,
            "checkpoints": {"keep": 2},
            "heartbeat_interval": 1,
            "grace_period": 3,
            **study,
        },
        "search_space": {
            "model.init_args.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
            "data.init_args.batch_size": {"type": "categorical", "choices": [64, 128]},
        },
        "trainer": {"max_epochs": max_epochs, "accelerator": "cpu", "devices": 1},
        "model": {"class_path": "lightstudy.examples.ConvNet", "init_args": {"channels": 8, "hidden": 32}},
        "data": {"class_path": "lightstudy.examples.DigitsDataModule", "init_args": {"batch_size": 64}},
    }
    return doc


def write_spec(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the test, dropped afterwards (the server must run: CI starts it)."""
    import psycopg

    admin = PG_BASE.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    name = f"ls_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_BASE}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``lightstudy`` entry point in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("LIGHTSTUDY_STORAGE", None) if env is None or "LIGHTSTUDY_STORAGE" not in env else None
    result = subprocess.run(
        [sys.executable, "-m", "lightstudy", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"lightstudy {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


@pytest.fixture(autouse=True)
def _no_env_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTSTUDY_STORAGE", raising=False)
