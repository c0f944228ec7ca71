"""Tiny data sets in torchvision's on-disk formats, and one real trial, for tests/test_vision.py."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from conftest import tiny_spec
from lightstudy.spec import spec_from_dict
from lightstudy.study import claim_trial, create_study, load_study
from lightstudy.trial import TrialJob, TrialOutcome, run_trial, trial_dir_name

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _labels(n: int, seed: int) -> np.ndarray:
    # Every class present, in a shuffled order.
    return np.random.default_rng(seed).permutation(np.arange(n) % 10).astype(np.uint8)


def _images(labels: np.ndarray, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Noise plus a brightness that depends on the class, so there is something to learn."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 60, size=(len(labels), *shape))
    return (noise + labels.reshape(-1, *[1] * len(shape)) * 19).astype(np.uint8)


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 40, n_test: int = 20) -> np.ndarray:
    """The four uncompressed idx files torchvision's MNIST/FashionMNIST read; returns the test labels."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        labels = _labels(n, seed)
        images = _images(labels, (28, 28), seed)
        # idx format: 0x0000, type 0x08 (uint8), number of dimensions, then big-endian int32 sizes.
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + struct.pack(">3i", n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", n) + labels.tobytes())
    return _labels(n_test, 1)


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 20) -> None:
    """``cifar-10-batches-py/``: five pickled training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        labels = _labels(n_test if name == "test_batch" else per_batch, seed)
        data = _images(labels, (3 * 32 * 32,), seed)  # rows of 1024 red, green, blue values
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels.tolist(), "batch_label": name}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch}, f)


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 8) -> Path:
    """``root/<class>/<i>.png`` with PNGs of several sizes and modes (ImageFolder reads them as RGB)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (12 + i % 3 * 4, 10 + i % 2 * 6)  # varying width x height
            pixels = rng.integers(0, 80, size=(size[1], size[0], 3)) + c * 80
            image = Image.fromarray(pixels.astype(np.uint8), "RGB")
            (image.convert("L") if i % 4 == 0 else image).save(root / name / f"{i}.png")
    return root


def vision_doc(model: dict[str, Any], data: dict[str, Any], **trainer: Any) -> dict[str, Any]:
    """A one-trial study: one epoch of two small batches on CPU."""
    doc = tiny_spec(n_trials=1, max_epochs=1)
    doc["search_space"] = {
        "model.init_args.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "data.init_args.batch_size": {"type": "categorical", "choices": [8]},
    }
    doc["trainer"].update(limit_train_batches=2, limit_val_batches=1, **trainer)
    doc["model"] = model
    doc["data"] = data
    return doc


def run_one_trial(tmp_path: Path, doc: dict[str, Any]) -> tuple[TrialOutcome, Any]:
    """Claim the study's first trial and run it in this process, as a worker's child would."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = spec_from_dict(doc)
    create_study(spec, url)
    study, spec = load_study(url, spec.study.name)
    trial, _ = claim_trial(study, spec)
    assert trial is not None
    job = TrialJob(
        storage_url=url,
        study_name=spec.study.name,
        trial_id=trial._trial_id,
        number=trial.number,
        spec=spec,
        params=dict(trial.params),
        seed=7,
        run_dir=str(tmp_path / "run"),
        trial_dir=trial_dir_name(trial.number),
        threads=1,
    )
    return run_trial(job), study.get_trials()[0]
