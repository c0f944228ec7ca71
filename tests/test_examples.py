from __future__ import annotations

import pytest
import torch

from lightstudy.examples import ConvNet, DigitsDataModule, classic


def test_digits_splits_are_seeded_and_disjoint() -> None:
    a, b = DigitsDataModule(split_seed=3), DigitsDataModule(split_seed=3)
    a.prepare_data()
    a.setup("fit")
    b.setup("fit")
    sizes = {k: len(v) for k, v in a._splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["val"] == sizes["test"] == 359
    assert torch.equal(a._splits["val"].tensors[0], b._splits["val"].tensors[0])
    other = DigitsDataModule(split_seed=4)
    other.setup("fit")
    assert not torch.equal(a._splits["val"].tensors[0], other._splits["val"].tensors[0])
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.long
    assert float(x.max()) <= 1.0
    assert len(a.predict_dataloader().dataset) == 359


def test_augmentation_changes_training_images_only() -> None:
    data = DigitsDataModule(augment=True, batch_size=16)
    data.setup("fit")
    torch.manual_seed(0)
    x, _ = data.train_dataloader().dataset[0]
    plain, _ = data._splits["train"][0]
    assert not torch.equal(x, plain)
    vx, _ = data.val_dataloader().dataset[0]
    assert torch.equal(vx, data._splits["val"][0][0])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.7, test_fraction=0.5)
    with pytest.raises(ValueError, match="optimizer"):
        ConvNet(optimizer="rmsprop")


@pytest.mark.parametrize("cls", [ConvNet, classic.ConvNet])
def test_convnet_steps(cls: type) -> None:
    model = cls(channels=8, hidden=16)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    assert model(x).shape == (4, 10)
    assert model.predict_step((x, y), 0).shape == (4,)
    assert model.hparams["channels"] == 8


def test_optimizers_and_scheduler() -> None:
    for name in ("adam", "adamw", "sgd"):
        opt = ConvNet(optimizer=name).configure_optimizers()
        assert isinstance(opt, torch.optim.Optimizer)
