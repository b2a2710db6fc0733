"""Image classification data through `datasets`: decoded once into uint8 tensors, augmented per batch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from sglr_zoo.errors import UserError
from sglr_zoo.recipe import DataConfig

DATA_ENV = "SGLR_ZOO_DATA"  # a folder holding local copies of Hub datasets, named by the id's last part
IMAGE_COLUMNS = ("img", "image", "images", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")


@dataclass
class ImageSet:
    """One split, decoded: uint8 images (N, C, H, W) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> ImageSet:
        """The first n examples (all when n is None)."""
        return self if n is None else ImageSet(self.images[:n], self.labels[:n], self.class_names)


class IndexedDataset(Dataset):
    """Yields (uint8 image, label, index); the index is what SGLR's per-example soft labels need."""

    def __init__(self, data: ImageSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.data.images[index], self.data.labels[index], index


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    num_classes: int
    source: str  # where the data was actually read from


def resolve_source(dataset: str) -> str:
    """A local path if `dataset` is one, or if $SGLR_ZOO_DATA holds a copy of the Hub id; else the Hub id."""
    if Path(dataset).expanduser().exists():
        return str(Path(dataset).expanduser())
    if os.environ.get(DATA_ENV):
        local = Path(os.environ[DATA_ENV]).expanduser() / dataset.rstrip("/").split("/")[-1]
        if local.exists():
            return str(local)
    return dataset


def _load_dataset_dict(source: str):
    import datasets

    local = Path(source).exists()
    if local and not any(p.is_file() for p in Path(source).rglob("*")):
        raise UserError(f"data.dataset: {source} holds no files; point it at a parquet folder or an image folder")
    try:
        return datasets.load_dataset(source)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        if local:
            raise UserError(f"data.dataset: no images found in {source} ({error}); expected parquet files "
                            "(train-*.parquet, test-*.parquet) or an image folder (split/class/image.png)") from None
        raise UserError(f"data.dataset: could not load {source!r} from the Hugging Face Hub ({error}). Offline? "
                        f"Put a local copy in a folder and set {DATA_ENV} to its parent, or give a local path") from None
    except ConnectionError as error:
        raise UserError(f"data.dataset: could not reach the Hub for {source!r} ({error}); set {DATA_ENV} to a "
                        "folder with a local copy, or give a local path") from None


def _find_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], key: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"data.{key}: no column {wanted!r}; the dataset has {', '.join(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise UserError(f"data.{key}: cannot guess the column among {', '.join(columns)}; name it in the recipe")


def _decode(split, image_column: str, label_column: str, image_size: int) -> ImageSet:
    """Decodes every image once to RGB uint8; images of mixed sizes are resized to image_size."""
    feature = split.features[label_column]
    class_names = list(getattr(feature, "names", None) or [])
    images = [np.asarray(img.convert("RGB")) for img in split[image_column]]
    if len({img.shape for img in images}) > 1:
        images = [np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BILINEAR)) for img in images]
    array = np.stack(images).transpose(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(split[label_column]), dtype=torch.int64)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(array)), labels, class_names)


def load_splits(cfg: DataConfig) -> Splits:
    """Loads train (minus a held-out validation tail), optional validation and test splits."""
    source = resolve_source(cfg.dataset)
    dataset = _load_dataset_dict(source)
    for key in ("train_split", "test_split"):
        if getattr(cfg, key) not in dataset:
            raise UserError(f"data.{key}: split {getattr(cfg, key)!r} does not exist in {source}; "
                            f"available: {', '.join(dataset)}")
    columns = dataset[cfg.train_split].column_names
    image_column = _find_column(columns, cfg.image_column, IMAGE_COLUMNS, "image_column")
    label_column = _find_column(columns, cfg.label_column, LABEL_COLUMNS, "label_column")

    train_split = dataset[cfg.train_split]
    n_keep = len(train_split) - cfg.val_size
    if n_keep < 1:
        raise UserError(f"data.val_size: {cfg.val_size} leaves no training data (train has {len(train_split)})")
    val = None
    if cfg.val_size:
        val = _decode(train_split.select(range(n_keep, len(train_split))), image_column, label_column, cfg.image_size)
    train_rows = range(min(n_keep, cfg.n_train or n_keep))
    train = _decode(train_split.select(train_rows), image_column, label_column, cfg.image_size)
    test_split = dataset[cfg.test_split]
    test_rows = range(min(len(test_split), cfg.n_test or len(test_split)))
    test = _decode(test_split.select(test_rows), image_column, label_column, cfg.image_size)

    num_classes = cfg.num_classes or len(train.class_names) or int(train.labels.max()) + 1
    if int(train.labels.max()) >= num_classes:
        raise UserError(f"data.num_classes: labels go up to {int(train.labels.max())} but num_classes is {num_classes}")
    return Splits(train, val, test, num_classes, source)


def to_float(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [0, 1], resized to image_size if needed."""
    x = images.float().div_(255)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x


def augment(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """CIFAR augmentation on a batch, on its device: random crop with zero padding and horizontal flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    cropped = padded[batch, channels, rows, cols]
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
