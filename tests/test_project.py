"""A Lightning user's own project, as it is (issue 15): their folder, their config files, their
LightningCLI subclass with a ``link_arguments``; lightstudy run from that folder with no PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import REPO

MODEL = '''
from typing import Literal

import lightning.pytorch as lp
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class TinyNet(lp.LightningModule):
    """An MLP on the project's synthetic data."""

    def __init__(
        self,
        num_classes: int,
        features: int = 8,
        hidden: int = 16,
        lr: float = 0.01,
        dropout: float = 0.0,
        use_bias: bool = True,
        optimizer: Literal["adam", "sgd"] = "adam",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(features, hidden, bias=use_bias), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        cls = torch.optim.Adam if self.hparams.optimizer == "adam" else torch.optim.SGD
        return cls(self.parameters(), lr=self.hparams.lr)
'''

DATA = '''
import lightning.pytorch as lp
import torch
from torch.utils.data import DataLoader, TensorDataset


class BlobData(lp.LightningDataModule):
    """Points whose class is the largest of a fixed linear map: learnable in a few steps."""

    def __init__(self, num_classes: int = 3, features: int = 8, samples: int = 256, batch_size: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.features = features
        self.samples = samples
        self.batch_size = batch_size

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.samples, self.features, generator=g)
        w = torch.randn(self.features, self.num_classes, generator=g)
        y = (x @ w).argmax(-1)
        cut = self.samples * 3 // 4
        self.train_set = TensorDataset(x[:cut], y[:cut])
        self.val_set = TensorDataset(x[cut:], y[cut:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def predict_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)
'''

CLI = '''
from lightning.pytorch.cli import LightningCLI


class MyLightningCLI(LightningCLI):
    """The project's CLI: the model's classes come from the data module."""

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.init_args.num_classes", "model.init_args.num_classes")
        parser.link_arguments("data.init_args.features", "model.init_args.features")
'''

MAIN = """
from my_project.cli import MyLightningCLI

if __name__ == "__main__":
    MyLightningCLI()
"""

BASE = {
    "trainer": {
        "max_epochs": 5,
        "accelerator": "cpu",
        "devices": 1,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "enable_progress_bar": False,
    },
    "model": {"class_path": "my_project.model.TinyNet", "init_args": {"hidden": 16, "lr": 0.01}},
    "data": {"class_path": "my_project.data.BlobData", "init_args": {"num_classes": 3, "batch_size": 32}},
}
EXP_SMALL = {"trainer": {"max_epochs": 2}, "model": {"init_args": {"hidden": 8}}}


def make_project(root: Path) -> Path:
    """A researcher's folder: a package of their own, two config files and a main.py."""
    package = root / "my_project"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, text in (("model", MODEL), ("data", DATA), ("cli", CLI)):
        (package / f"{name}.py").write_text(textwrap.dedent(text).lstrip())
    (root / "main.py").write_text(MAIN.lstrip())
    (root / "configs").mkdir()
    (root / "configs" / "base.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
    (root / "configs" / "exp_small.yaml").write_text(yaml.safe_dump(EXP_SMALL, sort_keys=False))
    return root


def user_env() -> dict[str, str]:
    """The environment of a user who never heard of PYTHONPATH: lightstudy installed, nothing else."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LIGHTSTUDY_STORAGE")}
    env["PYTHONUNBUFFERED"] = "1"
    # This checkout's lightstudy, where an installed one would be; nothing of the user's project.
    env["PYTHONPATH"] = str(REPO / "src")
    return env


def lightstudy(*args: str, cwd: Path, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess[str]:
    # The console script, as a user types it: Python puts its own folder on sys.path, not the cwd.
    return subprocess.run(
        [str(Path(sys.executable).parent / "lightstudy"), *args],
        cwd=cwd,
        env={**user_env(), **extra},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


@pytest.mark.slow(seconds=70)
def test_a_users_project_from_its_folder(tmp_path: Path) -> None:
    """init → validate → run (2 workers) → best --export → plain LightningCLI fit of the export,
    all from the project folder, with none of the project on PYTHONPATH."""
    root = make_project(tmp_path / "project")
    (root / "studies").mkdir()
    out = _ok(
        lightstudy(
            "init",
            "--config",
            "configs/base.yaml",
            "--config",
            "configs/exp_small.yaml",
            "--cli",
            "my_project.cli.MyLightningCLI",
            "--metric",
            "val_acc",
            "--n-trials",
            "3",
            "--name",
            "blobs",
            "--out",
            "studies/blobs.yaml",
            cwd=root,
        )
    )
    assert "it validates" in out
    written = yaml.safe_load((root / "studies" / "blobs.yaml").read_text())
    assert written["config"] == ["../configs/base.yaml", "../configs/exp_small.yaml"]
    assert written["cli"] == "my_project.cli.MyLightningCLI"
    assert list(written["search_space"]) == ["model.init_args.lr"]  # the other proposals are commented
    text = (root / "studies" / "blobs.yaml").read_text()
    assert "# model.init_args.optimizer: {type: categorical, choices: [adam, sgd]}" in text  # Literal
    assert "# data.init_args.batch_size:" in text
    assert "num_classes" not in text.split("search_space:")[1].split("config:")[0]  # data, not a choice

    # Searching the hidden size too, and tiny trials: uncommenting as the user would.
    text = text.replace("  # model.init_args.hidden:", "  model.init_args.hidden:")
    text = text.replace("# trainer: {max_epochs: 10}", "trainer: {max_epochs: 1}")
    text = text.replace("pruner: {name: MedianPruner}", "pruner: null")
    (root / "studies" / "blobs.yaml").write_text(text)
    assert "study 'blobs', 2 parameters" in _ok(lightstudy("validate", "studies/blobs.yaml", cwd=root))

    # The same file without its CLI class: the link is missing, so LightningCLI wants num_classes.
    bare = root / "studies" / "bare.yaml"
    bare.write_text(text.replace("cli: my_project.cli.MyLightningCLI", ""))
    refused = lightstudy("validate", "studies/bare.yaml", cwd=root)
    assert refused.returncode == 2 and "num_classes" in refused.stderr, refused.stderr

    # Turned off, the project folder does not import, and the error says where it looked.
    off = lightstudy("validate", "studies/blobs.yaml", cwd=root, LIGHTSTUDY_NO_PROJECT_PATH="1")
    assert off.returncode == 2
    assert "No module named 'my_project'" in off.stderr and "LIGHTSTUDY_NO_PROJECT_PATH=1" in off.stderr

    run = _ok(lightstudy("run", "studies/blobs.yaml", "--workers", "2", cwd=root))
    assert "best trial of blobs" in run, run
    import optuna

    study = optuna.load_study(study_name="blobs", storage=f"sqlite:///{root / 'runs' / 'blobs' / 'study.db'}")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3, [t.user_attrs.get("fail_reason") for t in trials]
    from lightstudy.study import SPEC_ATTR

    stored = study.user_attrs[SPEC_ATTR]
    # The resolved config is stored: a worker elsewhere needs no copy of the files.
    assert "config" not in stored
    assert stored["trainer"]["max_epochs"] == 1 and stored["trainer"]["limit_train_batches"] == 4
    assert stored["model"]["init_args"]["hidden"] == 8  # exp_small.yaml over base.yaml
    assert stored["cli"] == "my_project.cli.MyLightningCLI"

    _ok(lightstudy("best", "blobs", "--export", "exported", cwd=root))
    exported = yaml.safe_load((root / "exported" / "config.yaml").read_text())
    assert exported["model"]["init_args"]["num_classes"] == 3  # the link's target, filled in
    assert exported["model"]["init_args"]["hidden"] == study.best_params["model.init_args.hidden"]

    # A plain LightningCLI script trains the export, from the project folder, with no PYTHONPATH.
    # (Not `python -c`: jsonargparse reads a config from inside its folder, where '' no longer
    # points at the project; `best --export` says so.)
    (root / "train.py").write_text("from lightning.pytorch.cli import LightningCLI\n\nLightningCLI()\n")
    fit = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "exported/config.yaml", "--trainer.logger", "false"],
        cwd=root,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_epochs=1` reached" in fit.stderr + fit.stdout


def test_the_project_folders_go_first_on_sys_path_and_pythonpath(tmp_path: Path, monkeypatch) -> None:
    from lightstudy import project

    study = tmp_path / "studies" / "x.yaml"
    study.parent.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.delenv(project.OFF_VAR, raising=False)
    added = project.use_project_folder(study)
    assert added == [tmp_path.resolve(), study.parent.resolve()]
    assert sys.path[:2] == [str(tmp_path.resolve()), str(study.parent.resolve())]
    assert os.environ["PYTHONPATH"].split(os.pathsep) == [*sys.path[:2], "/elsewhere"]
    before, path_before = os.environ["PYTHONPATH"], list(sys.path)
    project.use_project_folder(study)  # idempotent: nothing added twice
    assert os.environ["PYTHONPATH"] == before and sys.path == path_before
    assert str(tmp_path.resolve()) in project.searched()


def test_turned_off_the_project_folder_is_not_added(tmp_path: Path, monkeypatch) -> None:
    from lightstudy import project

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv(project.OFF_VAR, "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert project.use_project_folder() == []
    assert str(tmp_path.resolve()) not in sys.path and "PYTHONPATH" not in os.environ
    assert f"{project.OFF_VAR}=1" in project.searched()
