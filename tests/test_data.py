"""Data: parquet and image folders decoded to uint8, validation carving, subsets, augmentation, real CIFAR-10."""

from __future__ import annotations

import os
import re
import warnings
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_splits(DataConfig(dataset=str(tiny_dataset), **cfg))
    assert (len(splits.train), len(splits.val or []), len(splits.test)) == (n_train, n_val, n_test)
    assert (splits.n_train, splits.n_val, splits.n_test) == (n_train, n_val, n_test)  # the real counts, for cards
    # Asking for more than a split holds is a warning that names the key and the count used.
    for key, used in (("n_train", n_train), ("n_test", n_test)):
        warned = [str(w.message) for w in caught if f"data.{key}" in str(w.message)]
        assert len(warned) == (cfg.get(key, 0) > used) and all(f"using {used}" in m for m in warned), warned
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
    monkeypatch.chdir(tmp_path)  # a typo in a local path fails at once, naming it, without asking the Hub
    for typo in ("cifar10/nodir", "./cifar1O", str(tmp_path / "cifar1O"), "a/b/c", "~/no/such"):
        with pytest.raises(UserError, match=f"data.dataset: no folder or file {re.escape(typo)} "):
            resolve_source(typo)


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


def _labelled_dataset(folder: Path, train: list, test: list, feature=None) -> Path:
    """A parquet dataset of tiny 8x8 images with the given label values and label feature (default int64)."""
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": feature or datasets.Value("int64")})
    folder.mkdir(parents=True, exist_ok=True)
    for split, labels in (("train", train), ("test", test)):
        images = [Image.new("RGB", (8, 8), (20 * i, 0, 0)) for i in range(len(labels))]
        data = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
        data.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def _class_label(n: int):
    import datasets

    return datasets.ClassLabel(names=[f"c{i}" for i in range(n)])


def _value(dtype: str):
    import datasets

    return datasets.Value(dtype)


# (name, train labels, test labels, label feature (None: int64), DataConfig keys, fragments of the message)
BAD_LABELS = [
    ("negative train label", [0, 1, -1, 1], [0, 1], None, {}, ["train split", "label -1"]),
    ("unlabelled test split", [0, 1, 0, 1], [0, -1], _class_label(2), {}, ["test split", "label -1"]),
    ("negative validation label", [0, 1, 0, 1, 1, -1], [0, 1], None, dict(val_size=2),
     ["validation split", "label -1"]),
    ("test label beyond the train labels", [0, 1, 2, 0], [0, 5], None, {},
     ["data.num_classes", "test split", "label 5", "num_classes is 3"]),
    ("test label beyond num_classes", [0, 1, 2, 0], [0, 7], _class_label(10), dict(num_classes=3),
     ["data.num_classes", "test split", "label 7"]),
    ("validation label beyond num_classes", [0, 1, 0, 1, 9], [0, 1], None, dict(val_size=1, num_classes=2),
     ["data.num_classes", "validation split", "label 9"]),
    ("float labels", [0.0, 1.0, 0.0, 1.0], [0.0, 1.0], _value("float32"), {}, ["data.label_column", "float32"]),
    ("fractional labels", [0.5, 1.5, 0.2, 1.0], [0.0, 1.0], _value("float64"), {}, ["data.label_column", "float64"]),
    ("text labels", ["0", "1", "0", "1"], ["0", "1"], _value("string"), {}, ["data.label_column", "string"]),
    ("boolean labels", [True, False, True, False], [True, False], _value("bool"), {}, ["data.label_column", "bool"]),
    ("a single class", [3, 3, 3, 3], [3, 3], None, {}, ["single class", "[3]", "at least 2"]),
    ("a single class of two names", [0, 0, 0, 0], [0, 1], _class_label(2), {}, ["single class"]),
]


@pytest.mark.parametrize("train, test, feature, cfg, fragments", [b[1:] for b in BAD_LABELS],
                         ids=[b[0] for b in BAD_LABELS])
def test_bad_labels(tmp_path, train, test, feature, cfg, fragments):
    folder = _labelled_dataset(tmp_path / "data", train, test, feature)
    with pytest.raises(UserError) as info:
        load_splits(DataConfig(dataset=str(folder), image_size=8, **cfg))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_good_labels_pass(tmp_path):
    """The checks let ordinary data through: int labels of several widths, a ClassLabel, a subset of one class."""
    for dtype in ("int8", "int32", "uint8", "int64"):
        folder = _labelled_dataset(tmp_path / dtype, [0, 1, 2, 1], [2, 0], _value(dtype))
        splits = load_splits(DataConfig(dataset=str(folder), image_size=8))
        assert splits.num_classes == 3 and splits.train.labels.tolist() == [0, 1, 2, 1]
    # The class count is a property of the training split; a quick run on its first example is allowed.
    assert load_splits(DataConfig(dataset=str(folder), image_size=8, n_train=1)).n_train == 1


def test_bad_test_label_stops_the_cli_before_training(tmp_path, capsys):
    from sglr_zoo.cli import main

    folder = _labelled_dataset(tmp_path / "data", [0, 1, 0, 1], [0, 4])
    recipe = tmp_path / "bad_labels.yaml"
    recipe.write_text(f"data:\n  dataset: {folder}\n  image_size: 8\nmodel:\n  arch: preactresnet_tiny_cifar\n"
                      f"run:\n  output_dir: {tmp_path / 'runs'}\n")
    with pytest.raises(SystemExit) as info:
        main(["train", str(recipe)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("sglr-zoo train: error: ") and "test split holds the label 4" in lines[-1]
    assert not list((tmp_path / "runs").rglob("checkpoints/*"))  # stopped before any training step


def _csv_dataset(folder: Path, train: str, test: str = "image,label\n0.png,a\n1.png,b\n") -> Path:
    """A CSV-of-paths dataset: four 8x8 PNGs 0.png..3.png and train.csv / test.csv with the given text."""
    for i in range(4):
        _write_png(folder / f"{i}.png", (60 * i, 0, 0), size=8)
    (folder / "train.csv").write_text(train)
    (folder / "test.csv").write_text(test)
    return folder


GOOD_TRAIN = "image,label\n0.png,a\n1.png,b\n2.png,a\n3.png,b\n"


def test_csv_dataset_reads(tmp_path):
    splits = load_splits(DataConfig(dataset=str(_csv_dataset(tmp_path / "data", GOOD_TRAIN)), image_size=8))
    assert (len(splits.train), len(splits.test), splits.train.class_names) == (4, 2, ["a", "b"])


@pytest.mark.parametrize("train, test, fragment", [
    ("image,label\n", None, "train.csv has a header but no rows"),
    (GOOD_TRAIN, "image,label\n\n", "test.csv has a header but no rows"),
    ("", None, "train.csv has no rows"),
])
def test_csv_without_rows(tmp_path, train, test, fragment):
    folder = _csv_dataset(tmp_path / "data", train, *(test,) if test else ())
    with pytest.raises(UserError, match="data.dataset: .*" + re.escape(fragment)) as info:
        load_splits(DataConfig(dataset=str(folder), image_size=8))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", ["../secret.png", "sub/../../secret.png", "{secret}"])
def test_csv_paths_stay_in_the_csv_folder(tmp_path, path):
    secret = tmp_path / "secret.png"
    _write_png(secret, (255, 255, 255), size=8)
    path = path.format(secret=secret)
    folder = _csv_dataset(tmp_path / "data", f"image,label\n0.png,a\n1.png,b\n{path},a\n")
    with pytest.raises(UserError) as info:
        load_splits(DataConfig(dataset=str(folder), image_size=8))
    assert str(info.value) == (f"data.dataset: {folder / 'train.csv'}, row 3: the image path {path!r} leaves the "
                               f"CSV's folder; paths are relative to {folder} and stay inside it")


PLANTS = {"a FIFO": os.mkfifo, "a character device": lambda path: path.symlink_to("/dev/zero"), "a folder": Path.mkdir}


@pytest.mark.parametrize("kind", PLANTS)
def test_csv_image_that_is_no_file(tmp_path, kind):
    """A FIFO once hung the decoding; /dev/zero would read until memory ran out."""
    folder = _csv_dataset(tmp_path / "data", GOOD_TRAIN)
    (folder / "2.png").unlink()
    PLANTS[kind](folder / "2.png")
    with pytest.raises(UserError) as info:
        load_splits(DataConfig(dataset=str(folder), image_size=8))
    assert str(info.value) == (f"data.dataset: {folder / '2.png'}: not a regular file ({kind}); a dataset image must "
                               "be a plain file")


@pytest.mark.parametrize("size", [40, 50])  # over PIL's pixel limit (a warning), over twice it (an error)
def test_decompression_bomb_is_one_line(tmp_path, monkeypatch, size):
    from PIL import Image

    folder = _csv_dataset(tmp_path / "data", GOOD_TRAIN)
    _write_png(folder / "2.png", (0, 0, 0), size=size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as if 2.png were a gigapixel image
    message = re.escape(f"cannot read image {folder / '2.png'} (") + ".*decompression bomb"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning, then decoding anyway
        with pytest.raises(UserError, match=message):
            load_splits(DataConfig(dataset=str(folder), image_size=8))


@pytest.mark.parametrize("train, test, cfg, split, unseen", [
    ([0, 2, 0, 2], [1, 0], {}, "test", "c1"),
    ([0, 1, 0, 1, 2], [0, 1], dict(val_size=1), "validation", "c2"),  # the training part never has class 2
])
def test_a_class_the_training_split_never_has_is_a_warning(tmp_path, train, test, cfg, split, unseen):
    folder = _labelled_dataset(tmp_path / "data", train, test, _class_label(3))
    with pytest.warns(UserWarning, match=f"the {split} split holds 1 class\\(es\\) that the training split 'train' "
                                         f"has no example of \\({unseen}\\); the model cannot learn them"):
        load_splits(DataConfig(dataset=str(folder), image_size=8, **cfg))
