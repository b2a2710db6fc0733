"""Data: parquet and image folders decoded to uint8, validation carving, subsets, augmentation, real CIFAR-10."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sglr_zoo.data import DATA_ENV, IndexedDataset, augment, load_splits, resolve_source, to_float
from sglr_zoo.errors import UserError
from sglr_zoo.recipe import DataConfig


@pytest.fixture(scope="module")
def tiny(tiny_dataset):
    return load_splits(DataConfig(dataset=str(tiny_dataset)))


def test_tiny_parquet(tiny, tiny_dataset):
    assert tiny.source == str(tiny_dataset)
    assert (len(tiny.train), len(tiny.test)) == (64, 32)
    assert tiny.val is None
    assert tiny.num_classes == 10 and len(tiny.train.class_names) == 10
    for split in (tiny.train, tiny.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == torch.int64
        assert 0 <= int(split.labels.min()) and int(split.labels.max()) < 10


@pytest.mark.parametrize("cfg, n_train, n_val, n_test", [
    (dict(val_size=10), 54, 10, 32),
    (dict(n_train=20, n_test=5), 20, 0, 5),
    (dict(val_size=10, n_train=20), 20, 10, 32),
    (dict(val_size=10, n_train=60), 54, 10, 32),  # n_train is capped by what val leaves
    (dict(n_test=100), 64, 0, 32),
])
def test_val_and_subsets(tiny, tiny_dataset, cfg, n_train, n_val, n_test):
    splits = load_splits(DataConfig(dataset=str(tiny_dataset), **cfg))
    assert (len(splits.train), len(splits.val or []), len(splits.test)) == (n_train, n_val, n_test)
    # Train and test subsets are the first examples; validation is the END of train.
    assert torch.equal(splits.train.images, tiny.train.images[:n_train])
    assert torch.equal(splits.train.labels, tiny.train.labels[:n_train])
    assert torch.equal(splits.test.labels, tiny.test.labels[:n_test])
    if n_val:
        assert torch.equal(splits.val.images, tiny.train.images[-n_val:])
        assert torch.equal(splits.val.labels, tiny.train.labels[-n_val:])


def test_val_size_too_large(tiny_dataset):
    with pytest.raises(UserError, match="data.val_size"):
        load_splits(DataConfig(dataset=str(tiny_dataset), val_size=64))


def test_indexed_dataset(tiny):
    data = IndexedDataset(tiny.train)
    assert len(data) == 64
    image, label, index = data[5]
    assert index == 5 and torch.equal(image, tiny.train.images[5]) and label == tiny.train.labels[5]
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)))
    assert batch[0].shape == (8, 3, 32, 32) and batch[2].tolist() == list(range(8))


def _coded_images(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Images whose every pixel value is distinct and non-zero, so a crop's offset can be read back."""
    code = torch.arange(1, 3 * 32 * 32 + 1, dtype=torch.float32).view(1, 3, 32, 32).repeat(n, 1, 1, 1)
    if dtype == torch.uint8:  # 8 bits cannot hold the code: use row/col-coded values instead
        rows = torch.arange(32).view(1, 1, 32, 1) * 7 + torch.arange(32).view(1, 1, 1, 32) + 1
        return (rows % 255 + 1).to(torch.uint8).expand(n, 3, 32, 32).clone()
    return code / 4096  # exact in float32, in (0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_augment_is_a_padded_crop_or_its_flip(dtype):
    torch.manual_seed(0)
    images = _coded_images(100, dtype)
    out = augment(images)
    assert out.shape == images.shape and out.dtype == dtype
    if dtype == torch.float32:
        assert out.min() >= 0 and out.max() <= 1
    padded = torch.nn.functional.pad(images[0], (4, 4, 4, 4))
    candidates = {(dy, dx, flip): padded[:, dy:dy + 32, dx:dx + 32].flip(2) if flip else padded[:, dy:dy + 32, dx:dx + 32]
                  for dy in range(9) for dx in range(9) for flip in (False, True)}
    found = []
    for image in out:
        matches = [key for key, crop in candidates.items() if torch.equal(image, crop)]
        assert matches, "output is not a crop of the zero-padded image"
        found.append(matches[0])
    offsets, flips = {(dy, dx) for dy, dx, _ in found}, [flip for _, _, flip in found]
    assert len(offsets) > 40  # of the 81 possible
    assert 0.3 < np.mean(flips) < 0.7


def test_augment_is_seeded():
    images = torch.rand(4, 3, 32, 32)
    torch.manual_seed(1)
    first = augment(images)
    torch.manual_seed(1)
    assert torch.equal(first, augment(images))


@pytest.mark.parametrize("size", [32, 64, 16])
def test_to_float(tiny, size):
    x = to_float(tiny.train.images[:4], size)
    assert x.dtype == torch.float32 and x.shape == (4, 3, size, size)
    assert x.min() >= 0 and x.max() <= 1
    if size == 32:
        torch.testing.assert_close(x, tiny.train.images[:4].float() / 255)


def _write_png(path: Path, colour: tuple[int, int, int], size: int = 32) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(path)


def test_image_folder(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(n):
                # Mixed sizes in train: decoded images are resized to image_size.
                _write_png(tmp_path / split / name / f"{i}.png", (100 * c, 10 * i, 50), size=32 if i else 40)
    splits = load_splits(DataConfig(dataset=str(tmp_path)))
    assert (len(splits.train), len(splits.test)) == (6, 4)
    assert splits.train.class_names == ["cat", "dog"] and splits.num_classes == 2
    assert splits.train.images.shape == (6, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert sorted(splits.train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    for image, label in zip(splits.test.images, splits.test.labels):
        assert int(image[0, 0, 0]) == 100 * int(label)  # red channel codes the class


@pytest.mark.parametrize("files", [[], ["notes.bin"], ["README.md"], ["sub/a.dat"]], ids=["empty", "bin", "readme", "nested"])
def test_folder_without_images(tmp_path, files):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not an image\n")
    with pytest.raises(UserError, match="data.dataset") as info:
        load_splits(DataConfig(dataset=str(tmp_path)))
    assert str(tmp_path) in str(info.value)


def test_missing_split(tiny_dataset):
    with pytest.raises(UserError, match="data.test_split") as info:
        load_splits(DataConfig(dataset=str(tiny_dataset), test_split="validation"))
    assert "'validation'" in str(info.value) and "available: train, test" in str(info.value)


@pytest.mark.parametrize("key, value", [("image_column", "pixels"), ("label_column", "target")])
def test_wrong_column(tiny_dataset, key, value):
    with pytest.raises(UserError, match=f"data.{key}") as info:
        load_splits(DataConfig(dataset=str(tiny_dataset), **{key: value}))
    assert repr(value) in str(info.value) and "img, label" in str(info.value)


def test_labels_beyond_num_classes(tiny_dataset):
    with pytest.raises(UserError, match="data.num_classes"):
        load_splits(DataConfig(dataset=str(tiny_dataset), num_classes=2))


def test_resolve_source(tmp_path, monkeypatch):
    (tmp_path / "cifar10").mkdir()
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_source("uoft-cs/cifar10") == "uoft-cs/cifar10"
    assert resolve_source(str(tmp_path / "cifar10")) == str(tmp_path / "cifar10")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert resolve_source("uoft-cs/cifar10") == str(tmp_path / "cifar10")
    assert resolve_source("uoft-cs/cifar100") == "uoft-cs/cifar100"


@pytest.fixture(scope="module")
def cifar10(real_cifar10):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DATA_ENV, str(real_cifar10.parent))
        return load_splits(DataConfig(dataset="uoft-cs/cifar10"))


@pytest.mark.real_data
def test_real_cifar10(cifar10, real_cifar10):
    assert cifar10.source == str(real_cifar10)
    assert (len(cifar10.train), len(cifar10.test), cifar10.num_classes) == (50_000, 10_000, 10)
    assert cifar10.train.labels.bincount().tolist() == [5000] * 10
    assert cifar10.test.labels.bincount().tolist() == [1000] * 10
    assert cifar10.train.images.shape == (50_000, 3, 32, 32) and cifar10.train.images.dtype == torch.uint8
    assert (int(cifar10.train.images.min()), int(cifar10.train.images.max())) == (0, 255)
    assert cifar10.train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert cifar10.train.images[0, :, 0, 0].tolist() == [59, 62, 63]
    assert cifar10.train.class_names[:3] == ["airplane", "automobile", "bird"]
