"""DigitsDataModule: scikit-learn's bundled 8x8 digits (1797 images), no download needed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as lp
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["DigitsDataMixin", "DigitsDataModule"]


class _Transformed(Dataset):
    """Applies a per-image transform on the fly (training augmentation)."""

    def __init__(self, base: TensorDataset, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[index]
        return self.transform(x), y


class DigitsDataMixin:
    """The data module's logic, shared by the ``lightning.pytorch`` and ``pytorch_lightning`` classes."""

    def __init__(
        self,
        batch_size: int = 64,  # images per training batch
        val_fraction: float = 0.2,  # share of the 1797 images held out for validation
        test_fraction: float = 0.2,  # share held out for test (and predict)
        split_seed: int = 0,  # fixed, so every trial of a study sees the same split
        augment: bool = False,  # random affine jitter (torchvision.transforms.v2) on training images
        num_workers: int = 0,  # DataLoader workers; the data set is tiny, 0 is fastest
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                "`0 < val_fraction`, `0 <= test_fraction` and `val_fraction + test_fraction < 1` "
                f"must hold, but got ({val_fraction=}, {test_fraction=})."
            )
        if batch_size < 1:
            raise ValueError(f"`batch_size >= 1` must hold, but got {batch_size=}.")
        self.save_hyperparameters()  # type: ignore[attr-defined]
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.augment = augment
        self.num_workers = num_workers
        self.num_classes = 10
        self.image_shape = (1, 8, 8)
        self._splits: dict[str, TensorDataset] = {}

    def prepare_data(self) -> None:
        # Ships inside scikit-learn: this only proves the files are there, once per node.
        from sklearn.datasets import load_digits

        load_digits()

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, *self.image_shape) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(len(x) * self.val_fraction))
        n_test = int(round(len(x) * self.test_fraction))
        val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        self._splits = {
            "train": TensorDataset(x[train], y[train]),
            "val": TensorDataset(x[val], y[val]),
            "test": TensorDataset(x[test], y[test]),
        }

    def _train_set(self) -> Dataset:
        train = self._splits["train"]
        if not self.augment:
            return train
        from torchvision.transforms import v2

        jitter = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
        return _Transformed(train, jitter)

    def _loader(self, data: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train_set(), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._splits["val"], shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._splits["test"], shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        # The test split, in order, so predictions line up with the labels.
        return self._loader(self._splits["test"], shuffle=False)

    def files_dataloader(self, paths: list[str | Path]) -> DataLoader:
        """Batches of image files for ``predict``: grayscale, 8x8, scaled to [0, 1] like the data."""
        from PIL import Image

        images = []
        for path in paths:
            with Image.open(path) as image:
                gray = image.convert("L").resize((8, 8))
            images.append(torch.tensor(list(gray.getdata()), dtype=torch.float32).reshape(1, 8, 8) / 255.0)
        x = torch.stack(images) if images else torch.empty(0, 1, 8, 8)
        return DataLoader(TensorDataset(x, torch.full((len(images),), -1)), batch_size=self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"split_seed": self.split_seed}


class DigitsDataModule(DigitsDataMixin, lp.LightningDataModule):
    """scikit-learn's 8x8 digits as a ``lightning.pytorch`` LightningDataModule.

    Example:
        ``data: {class_path: lightstudy.examples.DigitsDataModule, init_args: {batch_size: 64}}``
    """
