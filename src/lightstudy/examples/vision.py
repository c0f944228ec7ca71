"""torchvision data sets as LightningDataModules: MNIST, FashionMNIST, CIFAR10 and any ImageFolder tree.

Every module takes the same keywords: where the files are (``root``, ``download``), how batches
are made (``batch_size``, ``num_workers``), a seeded train/val split of the training files
(``val_fraction``, ``split_seed``: identical for every trial of a study), per-image transforms
written the LightningCLI way, and an optional MixUp/CutMix on training batches::

    data:
      class_path: lightstudy.examples.CIFAR10DataModule
      init_args:
        root: data
        train_transforms:
          - {class_path: torchvision.transforms.v2.RandomCrop, init_args: {size: 32, padding: 4}}
          - RandomHorizontalFlip            # a bare name means torchvision.transforms.v2.<name>
        batch_transform: mixup_or_cutmix    # soft labels; the model must take probability targets

Your transforms run first, on the PIL image; ``ToImage``, ``ToDtype(float32, scale=True)`` and
``Normalize`` with the data set's mean and std always follow, so a list only says how to augment.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as lp
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from lightstudy.examples.transforms import batch_transform_parts, build_batch_transform, build_transforms

__all__ = [
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
]

_log = logging.getLogger(__name__)


class _Split(Dataset[tuple[Any, int]]):
    """A view of some items of a data set, with its own transform (train and val share files)."""

    def __init__(self, base: Any, indices: Sequence[int], transform: Callable[[Any], Any]) -> None:
        self.base = base
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[self.indices[index]]
        return self.transform(image), int(label)


class _Files(Dataset[tuple[Any, int]]):
    """Image files as (image, -1): the label is unknown."""

    def __init__(
        self, paths: Sequence[str | Path], mode: str, size: tuple[int, int] | None, transform: Callable[[Any], Any]
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.mode = mode
        self.size = size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert(self.mode)
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{path}: cannot be read as an image ({e}); fix: pass PNG or JPEG files") from e
        if self.size is not None and image.size != self.size:
            image = image.resize(self.size)
        return self.transform(image), -1


class _VisionDataModule(lp.LightningDataModule):
    """Loading, splitting, transforms and batch mixing shared by the torchvision data modules.

    Each public subclass calls ``save_hyperparameters`` itself, so that the saved hyperparameters
    are its own constructor's arguments (what ``load_from_checkpoint`` passes back).
    """

    mean: tuple[float, ...] = (0.5,)  # per-channel statistics of the training images, in [0, 1]
    std: tuple[float, ...] = (0.5,)
    file_mode = "RGB"  # PIL mode image files are converted to for prediction
    file_size: tuple[int, int] | None = None  # (width, height) they are resized to; None: as they are

    def __init__(
        self,
        root: str = "data",  # folder holding (or receiving) the data set's files
        download: bool = False,  # fetch the files into root when they are missing (needs the network)
        batch_size: int = 128,  # images per batch
        val_fraction: float = 0.1,  # share of the training files held out for validation
        split_seed: int = 0,  # fixed, so every trial of a study sees the same split
        num_workers: int = 4,  # DataLoader processes decoding and augmenting; 0 loads in the trial
        train_transforms: list[str | dict[str, Any]] | None = None,  # augmentations, training only
        eval_transforms: list[str | dict[str, Any]] | None = None,  # for val, test and predict
        batch_transform: str | dict[str, Any] | None = None,  # mixup, cutmix, mixup_or_cutmix, a class, none
        batch_transform_alpha: float = 1.0,  # Beta(alpha, alpha) mixing of mixup/cutmix
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"`0 < val_fraction < 1` must hold, but got {val_fraction=}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size >= 1` must hold, but got {batch_size=}.")
        self.root = Path(root)
        self.download = download
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        # Built now so that a bad name fails when the trial starts, not after the first epoch.
        self.train_transforms = build_transforms(train_transforms, "train_transforms")
        self.eval_transforms = build_transforms(eval_transforms, "eval_transforms")
        if isinstance(batch_transform, str) and batch_transform.lower() == "none":
            batch_transform = None  # a categorical search space can offer "none" beside mixup, cutmix
        self.batch_transform_spec = batch_transform
        self.batch_transform_alpha = batch_transform_alpha
        if batch_transform is not None:
            batch_transform_parts(batch_transform, batch_transform_alpha)  # refuse a bad name early
        self.batch_transform: Callable[..., Any] | None = None
        self.num_classes: int | None = None
        self.image_shape: tuple[int, ...] | None = None  # (channels, height, width) of a batch item
        self._splits: dict[str, _Split] = {}

    # What each data set provides.
    def _missing_files(self) -> list[Path]:
        raise NotImplementedError

    def _fetch(self) -> None:
        raise NotImplementedError

    def _where_files_go(self) -> str:
        raise NotImplementedError

    def _load(self, train: bool) -> Any:
        raise NotImplementedError

    def _pipeline(self, augment: list[Callable[..., Any]]) -> Callable[[Any], Any]:
        return v2.Compose(
            [
                *augment,
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )

    def _check_files(self) -> None:
        missing = self._missing_files()
        if missing:
            shown = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise FileNotFoundError(
                f"{type(self).__name__}: `root` {str(self.root)!r} must hold the data set's files, "
                f"but {len(missing)} are missing ({shown}); fix: pass download: true (needs the "
                f"network), or put the files there: {self._where_files_go()}"
            )

    def prepare_data(self) -> None:
        # Lightning calls this once per node, before any process reads the files.
        if self.download and self._missing_files():
            self.root.mkdir(parents=True, exist_ok=True)
            self._fetch()
        self._check_files()

    def setup(self, stage: str | None = None) -> None:
        self._check_files()  # setup runs on every node; prepare_data only on the first
        if stage in (None, "fit", "validate") and "train" not in self._splits:
            full = self._load(train=True)
            n_val = round(len(full) * self.val_fraction)
            if not 0 < n_val < len(full):
                raise ValueError(
                    f"{type(self).__name__}: `val_fraction` must leave images on both sides of the "
                    f"split, but got {self.val_fraction} of {len(full)} images; fix: change val_fraction"
                )
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.split_seed))
            self._splits["val"] = _Split(full, order[:n_val].tolist(), self._pipeline(self.eval_transforms))
            self._splits["train"] = _Split(full, order[n_val:].tolist(), self._pipeline(self.train_transforms))
        if stage in (None, "test", "predict") and "test" not in self._splits:
            test = self._load(train=False)
            self._splits["test"] = _Split(test, range(len(test)), self._pipeline(self.eval_transforms))
        self._after_setup()

    def _after_setup(self) -> None:
        if self.image_shape is None:
            first = next(iter(self._splits.values()))
            self.image_shape = tuple(first[0][0].shape)
        if self.batch_transform is None and self.num_classes is not None:
            self.batch_transform = build_batch_transform(
                self.batch_transform_spec, self.num_classes, self.batch_transform_alpha
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader[Any]:
        if split not in self._splits:
            raise RuntimeError(
                f"{type(self).__name__}: the {split} split must be set up first, but setup() has not "
                f"made it; fix: call setup() with the stage that uses it"
            )
        data = self._splits[split]
        on_gpu = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            # A last batch of one image breaks BatchNorm and has nothing to mix with.
            drop_last=shuffle and len(data) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=on_gpu,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader[Any]:
        # The test split, in order, so predictions line up with the labels.
        return self._loader("test", shuffle=False)

    def files_dataloader(self, paths: Sequence[str | Path]) -> DataLoader[Any]:
        """Batches of image files for ``predict``: read like the data set's images, eval transforms."""
        return DataLoader(
            _Files(paths, self.file_mode, self.file_size, self._pipeline(self.eval_transforms)),
            batch_size=self.batch_size,
            shuffle=False,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # On the device and for training batches only: validation scores stay on true labels.
        if self.batch_transform is not None and self.trainer is not None and self.trainer.training:
            images, labels = batch
            return self.batch_transform(images, labels)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"split_seed": self.split_seed}


_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class MNISTDataModule(_VisionDataModule):
    """MNIST (60k/10k 28x28 gray digits) from ``<root>/MNIST/raw/`` as a LightningDataModule.

    Example:
        ``data: {class_path: lightstudy.examples.MNISTDataModule, init_args: {root: data}}``
    """

    dataset_cls: type[datasets.MNIST] = datasets.MNIST
    mean = (0.1307,)
    std = (0.3081,)
    file_mode = "L"
    file_size = (28, 28)

    def __init__(
        self,
        root: str = "data",  # folder holding (or receiving) <root>/MNIST/raw/
        download: bool = False,  # fetch the files into root when they are missing (needs the network)
        batch_size: int = 128,  # images per batch
        val_fraction: float = 0.1,  # share of the 60k training images held out for validation
        split_seed: int = 0,  # fixed, so every trial of a study sees the same split
        num_workers: int = 4,  # DataLoader processes decoding and augmenting; 0 loads in the trial
        train_transforms: list[str | dict[str, Any]] | None = None,  # augmentations, training only
        eval_transforms: list[str | dict[str, Any]] | None = None,  # for val, test and predict
        batch_transform: str | dict[str, Any] | None = None,  # mixup, cutmix, mixup_or_cutmix, a class, none
        batch_transform_alpha: float = 1.0,  # Beta(alpha, alpha) mixing of mixup/cutmix
    ) -> None:
        super().__init__(
            root,
            download,
            batch_size,
            val_fraction,
            split_seed,
            num_workers,
            train_transforms,
            eval_transforms,
            batch_transform,
            batch_transform_alpha,
        )
        self.save_hyperparameters()
        self.num_classes = 10
        self.image_shape = (1, 28, 28)

    def _raw(self) -> Path:
        return self.root / self.dataset_cls.__name__ / "raw"

    def _missing_files(self) -> list[Path]:
        return [self._raw() / name for name in _MNIST_FILES if not (self._raw() / name).is_file()]

    def _where_files_go(self) -> str:
        return f"{self._raw()}/ with the four uncompressed idx files ({', '.join(_MNIST_FILES)})"

    def _fetch(self) -> None:
        self.dataset_cls(str(self.root), train=True, download=True)

    def _load(self, train: bool) -> Any:
        return self.dataset_cls(str(self.root), train=train)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (60k/10k 28x28 gray clothes) from ``<root>/FashionMNIST/raw/``.

    Same arguments and files names as :class:`MNISTDataModule`.

    Example:
        ``data: {class_path: lightstudy.examples.FashionMNISTDataModule, init_args: {root: data}}``
    """

    dataset_cls = datasets.FashionMNIST
    mean = (0.2860,)
    std = (0.3530,)


class _UnverifiedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 reader without the MD5 checks: for files in that format made elsewhere."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class CIFAR10DataModule(_VisionDataModule):
    """CIFAR-10 (50k/10k 32x32 colour images, 10 classes) from ``<root>/cifar-10-batches-py/``.

    The files are read with torchvision's reader, which checks them against the official MD5
    sums. ``verify_integrity: false`` skips that check, for files in the same pickled format that
    you made yourself (a subset, a test fixture); official files are always worth checking.

    Example:
        ``data: {class_path: lightstudy.examples.CIFAR10DataModule, init_args: {root: data}}``
    """

    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    file_size = (32, 32)

    def __init__(
        self,
        root: str = "data",  # folder holding (or receiving) <root>/cifar-10-batches-py/
        download: bool = False,  # fetch the files into root when they are missing (needs the network)
        batch_size: int = 128,  # images per batch
        val_fraction: float = 0.1,  # share of the 50k training images held out for validation
        split_seed: int = 0,  # fixed, so every trial of a study sees the same split
        num_workers: int = 4,  # DataLoader processes decoding and augmenting; 0 loads in the trial
        train_transforms: list[str | dict[str, Any]] | None = None,  # augmentations, training only
        eval_transforms: list[str | dict[str, Any]] | None = None,  # for val, test and predict
        batch_transform: str | dict[str, Any] | None = None,  # mixup, cutmix, mixup_or_cutmix, a class, none
        batch_transform_alpha: float = 1.0,  # Beta(alpha, alpha) mixing of mixup/cutmix
        verify_integrity: bool = True,  # check the official MD5 sums; false only for files you made
    ) -> None:
        super().__init__(
            root,
            download,
            batch_size,
            val_fraction,
            split_seed,
            num_workers,
            train_transforms,
            eval_transforms,
            batch_transform,
            batch_transform_alpha,
        )
        self.save_hyperparameters()
        self.verify_integrity = verify_integrity
        self.num_classes = 10
        self.image_shape = (3, 32, 32)

    def _folder(self) -> Path:
        return self.root / datasets.CIFAR10.base_folder

    def _official(self) -> list[tuple[str, str]]:
        cls = datasets.CIFAR10
        return [(n, md5) for n, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]

    def _missing_files(self) -> list[Path]:
        return [self._folder() / n for n, _ in self._official() if not (self._folder() / n).is_file()]

    def _where_files_go(self) -> str:
        names = ", ".join(n for n, _ in self._official())
        return f"{self._folder()}/ with the pickled batches of cifar-10-python.tar.gz ({names})"

    def _fetch(self) -> None:
        datasets.CIFAR10(str(self.root), train=True, download=True)

    def _check_files(self) -> None:
        super()._check_files()
        if not self.verify_integrity:
            return
        corrupt = [n for n, md5 in self._official() if not check_integrity(str(self._folder() / n), md5)]
        if corrupt:
            raise ValueError(
                f"CIFAR10DataModule: the files in {str(self._folder())!r} must match the official "
                f"CIFAR-10 MD5 sums, but {', '.join(corrupt)} do not; fix: delete the folder and pass "
                "download: true, or, for files you made yourself in that format, verify_integrity: false"
            )

    def _load(self, train: bool) -> Any:
        reader = datasets.CIFAR10 if self.verify_integrity else _UnverifiedCIFAR10
        return reader(str(self.root), train=train)


class ImageFolderDataModule(_VisionDataModule):
    """Any ``<dir>/<class name>/<image>`` tree (torchvision's ImageFolder), as RGB images.

    ``train_dir`` holds the training images; validation and test images come from ``val_dir``
    and ``test_dir`` when given, else from seeded shares of ``train_dir`` (``val_fraction``,
    ``test_fraction``). Class indices follow the sorted folder names of ``train_dir``, and
    ``num_classes``/``image_shape`` are known after ``prepare_data``/``setup``.

    Example:
        ``data: {class_path: lightstudy.examples.ImageFolderDataModule,
        init_args: {root: data/flowers, image_size: 64}}``
    """

    def __init__(
        self,
        root: str = "data",  # folder the *_dir paths are relative to
        train_dir: str = "train",  # class sub-folders of training images
        val_dir: str | None = None,  # class sub-folders of validation images; null: split train_dir
        test_dir: str | None = None,  # class sub-folders of test images; null: split train_dir
        image_size: int | None = None,  # resize + center-crop to this many pixels; null: keep sizes
        mean: list[float] | None = None,  # per-channel mean in [0, 1]; null: ImageNet's
        std: list[float] | None = None,  # per-channel std in [0, 1]; null: ImageNet's
        batch_size: int = 64,  # images per batch
        val_fraction: float = 0.1,  # share of train_dir held out for validation when val_dir is null
        test_fraction: float = 0.1,  # share of train_dir held out for test when test_dir is null
        split_seed: int = 0,  # fixed, so every trial of a study sees the same split
        num_workers: int = 4,  # DataLoader processes decoding and augmenting; 0 loads in the trial
        train_transforms: list[str | dict[str, Any]] | None = None,  # augmentations, training only
        eval_transforms: list[str | dict[str, Any]] | None = None,  # for val, test and predict
        batch_transform: str | dict[str, Any] | None = None,  # mixup, cutmix, mixup_or_cutmix, a class, none
        batch_transform_alpha: float = 1.0,  # Beta(alpha, alpha) mixing of mixup/cutmix
    ) -> None:
        super().__init__(
            root,
            False,  # an ImageFolder has no download
            batch_size,
            val_fraction,
            split_seed,
            num_workers,
            train_transforms,
            eval_transforms,
            batch_transform,
            batch_transform_alpha,
        )
        self.save_hyperparameters()
        if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                "`0 <= test_fraction` and `val_fraction + test_fraction < 1` must hold, "
                f"but got ({val_fraction=}, {test_fraction=})."
            )
        if image_size is not None and image_size < 1:
            raise ValueError(f"`image_size >= 1` must hold, but got {image_size=}.")
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        self.image_size = image_size
        self.mean = tuple(mean) if mean is not None else (0.485, 0.456, 0.406)
        self.std = tuple(std) if std is not None else (0.229, 0.224, 0.225)
        self.test_fraction = test_fraction
        self.classes: list[str] | None = None

    def _dir(self, split: str) -> Path | None:
        name = self.dirs[split]
        return None if name is None else self.root / name

    def _missing_files(self) -> list[Path]:
        dirs = [d for d in map(self._dir, ("train", "val", "test")) if d is not None]
        return [d for d in dirs if not d.is_dir() or not any(p.is_dir() for p in d.iterdir())]

    def _where_files_go(self) -> str:
        return "one sub-folder of images per class in each of " + ", ".join(
            f"{split}_dir ({self._dir(split)})" for split in self.dirs if self._dir(split) is not None
        )

    def _check_files(self) -> None:
        super()._check_files()
        train = self._dir("train")
        assert train is not None
        self.classes = sorted(p.name for p in os.scandir(train) if p.is_dir())
        self.num_classes = len(self.classes)

    def _pipeline(self, augment: list[Callable[..., Any]]) -> Callable[[Any], Any]:
        # Resized after the augmentations, so that images of any size stack into a batch.
        size = [v2.Resize(self.image_size), v2.CenterCrop(self.image_size)] if self.image_size else []
        return super()._pipeline([*augment, *size])

    def _folder(self, split: str) -> Any:
        folder = datasets.ImageFolder(str(self._dir(split)), allow_empty=True)
        if folder.classes != self.classes:
            raise ValueError(
                f"ImageFolderDataModule: {split}_dir {str(self._dir(split))!r} must have the class "
                f"folders of train_dir ({self.classes}), but has {folder.classes}; fix: add the "
                "missing class folders (empty ones are fine) or remove the extra ones"
            )
        return folder

    def setup(self, stage: str | None = None) -> None:
        self._check_files()
        if self._splits:
            return
        train = self._folder("train")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        n_val = round(len(train) * self.val_fraction) if self._dir("val") is None else 0
        n_test = round(len(train) * self.test_fraction) if self._dir("test") is None else 0
        if len(train) - n_val - n_test < 1 or (self._dir("val") is None and n_val < 1):
            raise ValueError(
                f"ImageFolderDataModule: the split of train_dir must leave images for training and "
                f"validation, but got {len(train)} images with {self.val_fraction=} and "
                f"{self.test_fraction=}; fix: add images, change the fractions, or give val_dir"
            )
        evaluate, augment = self._pipeline(self.eval_transforms), self._pipeline(self.train_transforms)
        self._splits["train"] = _Split(train, order[n_val + n_test :], augment)
        for split, chunk in (("val", order[:n_val]), ("test", order[n_val : n_val + n_test])):
            if self._dir(split) is None:
                self._splits[split] = _Split(train, chunk, evaluate)
            else:
                other = self._folder(split)
                self._splits[split] = _Split(other, range(len(other)), evaluate)
        self._after_setup()
