"""torchvision data modules and TorchvisionClassifier, on tiny files in torchvision's own formats."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as lp
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

from conftest import REPO
from lightstudy.examples import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    TorchvisionClassifier,
)
from lightstudy.examples.transforms import build_batch_transform, build_transforms
from lightstudy.lightning_config import build, check_spec, import_class
from lightstudy.spec import load_spec, spec_from_dict
from lightstudy.summary import recorded_config
from vision_data import run_one_trial, vision_doc, write_cifar10, write_image_folder, write_mnist

MODEL = "lightstudy.examples.TorchvisionClassifier"


def _trainer(tmp_path: Path, **kwargs: Any) -> lp.Trainer:
    return lp.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def _case(name: str, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model init_args, data config) of one data module, with its files written under root."""
    small = {"arch": "resnet18", "small_images": True}
    if name in ("mnist", "fashion_mnist"):
        folder, cls = ("MNIST", "MNISTDataModule") if name == "mnist" else ("FashionMNIST", "FashionMNISTDataModule")
        write_mnist(root, folder)
        init = {
            "root": str(root),
            "val_fraction": 0.25,
            "batch_transform": "mixup" if name == "mnist" else None,
        }
        return {**small, "in_channels": 1}, {"class_path": f"lightstudy.examples.{cls}", "init_args": init}
    if name == "cifar10":
        write_cifar10(root)
        init = {
            "root": str(root),
            "verify_integrity": False,
            "val_fraction": 0.25,
            "train_transforms": [
                {
                    "class_path": "torchvision.transforms.v2.RandomCrop",
                    "init_args": {"size": 32, "padding": 4},
                },
                "RandomHorizontalFlip",
            ],
            "batch_transform": "cutmix",
        }
        return {**small, "in_channels": 3}, {
            "class_path": "lightstudy.examples.CIFAR10DataModule",
            "init_args": init,
        }
    write_image_folder(root / "train")
    init = {"root": str(root), "image_size": 16, "val_fraction": 0.25, "batch_transform": "mixup_or_cutmix"}
    return {**small, "num_classes": 3}, {
        "class_path": "lightstudy.examples.ImageFolderDataModule",
        "init_args": init,
    }


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "image_folder"])
def test_each_data_module_runs_a_real_trial(tmp_path: Path, name: str) -> None:
    model, data = _case(name, tmp_path / "data")
    data["init_args"]["num_workers"] = 0
    doc = vision_doc({"class_path": MODEL, "init_args": model}, data)
    outcome, frozen = run_one_trial(tmp_path, doc)
    assert outcome.state == "complete", outcome.reason
    assert outcome.values is not None and 0.0 <= outcome.values[0] <= 1.0
    assert set(frozen.intermediate_values) == {0}
    # LightningCLI kept the transform lists as written, so the recorded config reproduces the trial.
    recorded = recorded_config(frozen)["data"]["init_args"]
    for key, value in data["init_args"].items():
        assert recorded.get(key) == value  # the dump leaves out None


@pytest.mark.filterwarnings("ignore:`TorchvisionClassifier.configure_optimizers` will be overridden")
def test_a_spec_with_optimizer_and_lr_scheduler_sections_overrides_configure_optimizers(
    tmp_path: Path,
) -> None:
    doc = vision_doc(
        {"class_path": MODEL, "init_args": {"small_images": True, "in_channels": 1, "lr": 0.5}},
        {"class_path": "lightstudy.examples.DigitsDataModule", "init_args": {"batch_size": 16}},
    )
    doc["search_space"] = {"optimizer.init_args.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}}
    doc["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}
    doc["lr_scheduler"] = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}}
    check_spec(spec_from_dict(doc))

    built = build(copy.deepcopy(spec_from_dict(doc).lightning_config()), callbacks=[], seed=0)
    optimizers, schedulers = built.model.configure_optimizers()
    assert isinstance(optimizers[0], torch.optim.SGD) and optimizers[0].defaults["lr"] == 0.05
    assert isinstance(schedulers[0], torch.optim.lr_scheduler.StepLR)

    outcome, frozen = run_one_trial(tmp_path, doc)
    assert outcome.state == "complete", outcome.reason
    lr = frozen.params["optimizer.init_args.lr"]
    assert 0.01 <= lr <= 0.1 and recorded_config(frozen)["optimizer"]["init_args"]["lr"] == lr


@pytest.mark.filterwarnings("ignore:`TorchvisionClassifier.configure_optimizers` will be overridden")
@pytest.mark.parametrize("study", ["fashion_mnist", "cifar10_resnet"])
def test_shipped_vision_studies_train_on_tiny_files(tmp_path: Path, study: str) -> None:
    doc = load_spec(REPO / "studies" / f"{study}.yaml").to_dict()
    data = doc["data"]["init_args"]
    if study == "fashion_mnist":
        write_mnist(tmp_path / "data", "FashionMNIST")
    else:
        write_cifar10(tmp_path / "data")
        data["verify_integrity"] = False  # made here, not the official files
    data.update(root=str(tmp_path / "data"), num_workers=0, val_fraction=0.25)
    # Every batch transform the study may pick is one the data module takes.
    cls = import_class(doc["data"]["class_path"])
    for choice in doc["search_space"]["data.init_args.batch_transform"]["choices"]:
        cls(**{**data, "batch_transform": choice})
    doc["search_space"]["data.init_args.batch_size"] = {"type": "categorical", "choices": [8]}
    doc["trainer"] = {"max_epochs": 1, "accelerator": "cpu", "devices": 1}
    doc["trainer"].update(limit_train_batches=2, limit_val_batches=1)
    outcome, frozen = run_one_trial(tmp_path, doc)
    assert outcome.state == "complete", outcome.reason
    assert set(frozen.params) == set(doc["search_space"])


def test_splits_are_seeded_and_predict_is_the_test_set_in_order(tmp_path: Path) -> None:
    test_labels = write_mnist(tmp_path)
    a, b = (MNISTDataModule(str(tmp_path), val_fraction=0.25, split_seed=3, num_workers=0) for _ in range(2))
    other = MNISTDataModule(str(tmp_path), val_fraction=0.25, split_seed=4, num_workers=0)
    for data in (a, b, other):
        data.prepare_data()
        data.setup("fit")
    assert a._splits["val"].indices == b._splits["val"].indices != other._splits["val"].indices
    assert sorted(a._splits["val"].indices + a._splits["train"].indices) == list(range(40))
    assert (len(a._splits["train"]), len(a._splits["val"])) == (30, 10)
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert a.num_classes == 10 and a.image_shape == (1, 28, 28)
    # Normalized with MNIST's statistics: a black pixel is -mean/std.
    assert float(x.min()) >= -0.1307 / 0.3081 - 1e-4 and float(x.max()) > 1.0

    a.setup("predict")
    labels = torch.cat([batch[1] for batch in a.predict_dataloader()])
    assert labels.tolist() == test_labels.tolist()


class _Recording(TorchvisionClassifier):
    """Remembers the targets' shapes each stage sees."""

    seen: dict[str, set[tuple[int, ...]]]

    def on_fit_start(self) -> None:
        self.seen = {"train": set(), "val": set()}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen["train"].add(tuple(batch[1].shape))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen["val"].add(tuple(batch[1].shape))
        super().validation_step(batch, batch_idx)


def test_fit_mixes_training_batches_and_test_logs_per_class_scores(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    data = MNISTDataModule(str(tmp_path), batch_size=8, val_fraction=0.25, num_workers=0, batch_transform="cutmix")
    model = _Recording(small_images=True, in_channels=1)
    _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(model, datamodule=data)
    assert model.seen == {"train": {(8, 10)}, "val": {(8,)}}  # soft labels in training only
    scores = _trainer(tmp_path).test(model, datamodule=data, verbose=False)[0]
    assert {"test_loss", "test_acc", "test_f1"} <= set(scores)
    assert {f"test_acc_class_{i}" for i in range(10)} <= set(scores)
    predictions = torch.cat(_trainer(tmp_path).predict(model, datamodule=data))
    assert predictions.shape == (20,) and predictions.dtype == torch.long


@pytest.mark.parametrize(
    "cls",
    [
        MNISTDataModule,
        FashionMNISTDataModule,
        CIFAR10DataModule,
        ImageFolderDataModule,
        TorchvisionClassifier,
    ],
)
def test_hyperparameters_are_the_constructor_arguments(cls: type) -> None:
    # What load_from_checkpoint passes back to the constructor.
    assert list(cls().hparams) == [p for p in inspect.signature(cls).parameters]


def test_transforms_come_from_names_class_paths_and_init_args() -> None:
    built = build_transforms(
        [
            "RandomHorizontalFlip",
            {"class_path": "RandomCrop", "init_args": {"size": 8, "padding": 2}},
            {
                "class_path": "torchvision.transforms.v2.ToDtype",
                "init_args": {"dtype": "float32", "scale": True},
            },
            {"class_path": "torchvision.transforms.v2.RandomErasing"},
        ]
    )
    assert [type(t) for t in built] == [v2.RandomHorizontalFlip, v2.RandomCrop, v2.ToDtype, v2.RandomErasing]
    assert built[1].size == (8, 8) and built[1].padding == [2, 2, 2, 2]
    assert built[2].dtype == torch.float32
    assert build_transforms(None) == []

    data = CIFAR10DataModule(train_transforms=["RandomGrayscale"], eval_transforms=[])
    pipeline = data._pipeline(data.train_transforms)
    out = pipeline(v2.functional.to_pil_image(torch.full((3, 4, 4), 255, dtype=torch.uint8)))
    expected = (1 - torch.tensor(CIFAR10DataModule.mean)) / torch.tensor(CIFAR10DataModule.std)
    assert out.dtype == torch.float32 and torch.allclose(out[:, 0, 0], expected, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (
            {"train_transforms": ["RandomHorizontalFlipp"]},
            r"`train_transforms\[0\]`.*did you mean RandomHorizontalFlip",
        ),
        (
            {"eval_transforms": [{"class_path": "no.such.Transform"}]},
            r"`eval_transforms\[0\]`: class_path must import",
        ),
        ({"train_transforms": [{"class_path": "RandomCrop", "init_args": {"sise": 8}}]}, "RandomCrop.*sise"),
        ({"train_transforms": [{"class": "RandomCrop"}]}, "must be a class name or"),
        ({"train_transforms": "RandomCrop"}, "must be a list of transforms"),
        ({"batch_transform": "mixitup"}, "`batch_transform` must be one of mixup, cutmix, mixup_or_cutmix"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_data_arguments_are_refused_with_a_fix(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error) as info:
        MNISTDataModule(**kwargs)
    assert "fix" in str(info.value) or "val_fraction" in kwargs


def test_missing_files_name_the_root_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"MNISTDataModule: `root` .* 4 are missing .*download: true") as e:
        MNISTDataModule(str(tmp_path)).prepare_data()
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in str(e.value)
    with pytest.raises(FileNotFoundError, match="FashionMNIST/raw"):
        FashionMNISTDataModule(str(tmp_path)).setup("fit")
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/ with the pickled batches"):
        CIFAR10DataModule(str(tmp_path)).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"train_dir \(.*train\)"):
        ImageFolderDataModule(str(tmp_path)).prepare_data()


def test_cifar10_checks_the_official_checksums_unless_told_not_to(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(ValueError, match=r"must match the official CIFAR-10 MD5 sums.*verify_integrity: false"):
        CIFAR10DataModule(str(tmp_path)).prepare_data()
    data = CIFAR10DataModule(str(tmp_path), verify_integrity=False, num_workers=0)
    data.prepare_data()
    data.setup("test")
    image, label = data._splits["test"][0]
    assert image.shape == (3, 32, 32) and isinstance(label, int) and len(data._splits["test"]) == 20


def test_image_folder_uses_given_dirs_and_sorted_class_names(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val", per_class=2)
    data = ImageFolderDataModule(str(tmp_path), val_dir="val", image_size=8, test_fraction=0.25, num_workers=0)
    data.prepare_data()
    data.setup("fit")
    assert data.classes == ["cat", "dog", "fox"] and data.num_classes == 3 and data.image_shape == (3, 8, 8)
    assert [len(data._splits[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    x, _ = next(iter(data.val_dataloader()))
    assert x.shape == (6, 3, 8, 8)

    write_image_folder(tmp_path / "odd", classes=("cat", "dog"))
    odd = ImageFolderDataModule(str(tmp_path), test_dir="odd", num_workers=0)
    with pytest.raises(ValueError, match=r"test_dir .* must have the class folders of train_dir"):
        odd.setup("fit")


@pytest.mark.parametrize("name", ["mixup", "cutmix", "mixup_or_cutmix"])
def test_batch_transform_makes_soft_labels_for_training_batches_only(tmp_path: Path, name: str) -> None:
    write_mnist(tmp_path)
    data = MNISTDataModule(str(tmp_path), batch_size=16, val_fraction=0.25, batch_transform=name, num_workers=0)
    data.setup("fit")
    torch.manual_seed(0)
    x, y = next(iter(data.train_dataloader()))
    data.trainer = SimpleNamespace(training=True)  # type: ignore[assignment]
    mixed_x, soft = data.on_after_batch_transfer((x.clone(), y.clone()), 0)
    assert soft.shape == (16, 10) and soft.dtype == torch.float32
    assert torch.allclose(soft.sum(dim=1), torch.ones(16))
    assert (soft > 0).sum(dim=1).max() == 2  # two classes mixed into each label
    assert not torch.equal(mixed_x, x)

    data.trainer = SimpleNamespace(training=False)  # type: ignore[assignment]
    same_x, same_y = data.on_after_batch_transfer((x, y), 0)
    assert same_x is x and same_y is y


def test_batch_transform_from_a_class_path_gets_num_classes() -> None:
    mix = build_batch_transform({"class_path": "torchvision.transforms.v2.MixUp", "init_args": {"alpha": 0.4}}, 7)
    assert isinstance(mix, v2.MixUp) and mix.num_classes == 7 and mix.alpha == 0.4
    assert isinstance(build_batch_transform("mixup_or_cutmix", 10), v2.RandomChoice)
    assert build_batch_transform(None, 10) is None and build_batch_transform("none", 10) is None
    assert MNISTDataModule(batch_transform="none").batch_transform_spec is None
    with pytest.raises(ValueError, match=r"MixUp.*alpha"):
        build_batch_transform("mixup", 10, alpha=-1.0)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer: a bare step
def test_classifier_trains_on_soft_labels() -> None:
    torch.manual_seed(0)
    model = TorchvisionClassifier(small_images=True, in_channels=1, label_smoothing=0.1)
    x = torch.rand(8, 1, 8, 8)
    soft = v2.MixUp(alpha=1.0, num_classes=10)(x, torch.arange(8))[1]
    loss = model.training_step((x, soft), 0)
    expected = F.cross_entropy(model(x), soft, label_smoothing=0.1)
    assert torch.isfinite(loss) and torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert model.model.conv1.weight.grad is not None and model.model.conv1.weight.grad.abs().sum() > 0
    assert model.predict_step((x, soft), 0).shape == (8,)


def test_classifier_adapts_to_one_channel_small_images() -> None:
    model = TorchvisionClassifier(arch="resnet18", num_classes=10, in_channels=1, small_images=True)
    conv = model.model.conv1
    assert (conv.in_channels, conv.kernel_size, conv.stride) == (1, (3, 3), (1, 1))
    assert isinstance(model.model.maxpool, torch.nn.Identity)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)

    gray = TorchvisionClassifier(arch="mobilenet_v3_small", num_classes=4, in_channels=1)
    assert gray.model.features[0][0].in_channels == 1
    assert gray(torch.rand(2, 1, 32, 32)).shape == (2, 4)

    with pytest.raises(ValueError, match="did you mean resnet18"):
        TorchvisionClassifier(arch="resnet81")
    with pytest.raises(ValueError, match="small_images` needs a ResNet-style model"):
        TorchvisionClassifier(arch="mobilenet_v3_small", small_images=True)


def test_classifier_loads_a_local_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    imagenet_like = torchvision.models.resnet18(num_classes=1000)  # 3 channels, another head
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet_like.state_dict(), path)

    model = TorchvisionClassifier(num_classes=10, in_channels=1, pretrained_weights=str(path))
    body, fresh = model.model.layer4[1].conv2.weight, model.model.fc.weight
    assert torch.equal(body, imagenet_like.layer4[1].conv2.weight)
    assert fresh.shape == (10, 512)
    # RGB filters summed into one gray channel.
    assert torch.allclose(model.model.conv1.weight, imagenet_like.conv1.weight.sum(dim=1, keepdim=True))

    # A Lightning checkpoint's state_dict (keys under "model.") loads too, head included.
    ckpt = tmp_path / "trial.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ckpt)
    again = TorchvisionClassifier(num_classes=10, in_channels=1, pretrained_weights=str(ckpt))
    assert torch.equal(again.model.fc.weight, model.model.fc.weight)


def test_bad_weights_files_are_refused_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"must be a local state-dict file.*nothing is downloaded"):
        TorchvisionClassifier(pretrained_weights=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"must load with torch.load\(weights_only=True\).*fix"):
        TorchvisionClassifier(pretrained_weights=str(garbage))
    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    with pytest.raises(ValueError, match=r"must fit arch 'resnet18'.*layer1.2.conv1.weight \(not in the model\)"):
        TorchvisionClassifier(pretrained_weights=str(other))
