"""Image classification data through `datasets`: decoded once into uint8 tensors, augmented per batch."""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from sglr_zoo.errors import UserError
from sglr_zoo.files import MiB, read_regular
from sglr_zoo.recipe import DataConfig

DATA_ENV = "SGLR_ZOO_DATA"  # a folder holding local copies of Hub datasets, named by the id's last part
IMAGE_COLUMNS = ("img", "image", "images", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class")
PATH_COLUMNS = ("image", "path", "file", "filename", "filepath", "image_path", "img")  # CSV-of-paths datasets
IMAGE_LIMIT = 64 * MiB  # one encoded image file; larger is no training image, refused before it is read
CSV_LIMIT = 256 * MiB  # a CSV of image paths (a million rows is some 50 MB)
HOLDOUT_SEED = 0  # the held-out test split carved from train must not change with the run's seed


@dataclass
class ImageSet:
    """One split, decoded: uint8 images (N, C, H, W) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)


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

    @property
    def n_train(self) -> int:
        """Training examples actually used (after n_train and val_size)."""
        return len(self.train)

    @property
    def n_val(self) -> int:
        return len(self.val) if self.val is not None else 0

    @property
    def n_test(self) -> int:
        """Test examples actually used (after n_test)."""
        return len(self.test)


def resolve_source(dataset: str) -> str:
    """A local path if `dataset` is one, or if $SGLR_ZOO_DATA holds a copy of the Hub id; else the Hub id.

    A missing path that cannot be a Hub id (`./x`, `/x`, `a/b/c`, or `a/b` where the folder `a` exists here) is a
    UserError at once, not a Hub lookup that retries for half a minute.
    """
    path = Path(dataset).expanduser()
    if path.exists():
        return str(path)
    if os.environ.get(DATA_ENV):
        local = Path(os.environ[DATA_ENV]).expanduser() / dataset.rstrip("/").split("/")[-1]
        if local.exists():
            return str(local)
    if dataset.startswith((".", "/", "~")) or dataset.strip("/").count("/") > 1 or (
            path.parent != Path(".") and path.parent.is_dir()):
        raise UserError(f"data.dataset: no folder or file {dataset} (and it is no Hub id ORG/NAME): give an existing "
                        "parquet folder, image folder or CSV file")
    return dataset


def _load_dataset_dict(source: str):
    import datasets

    local = Path(source).exists()
    if local and not any(p.is_file() for p in Path(source).rglob("*")):
        raise UserError(f"data.dataset: {source} holds no files; point it at a parquet folder or an image folder")
    # A local folder's README.md without a YAML header (like ../shared/datasets/cifar10) is no error: silence
    # huggingface_hub's "Repo card metadata block was not found" while datasets reads it.
    card_logger = logging.getLogger("huggingface_hub.repocard")
    level = card_logger.level
    card_logger.setLevel(logging.ERROR)
    try:
        return datasets.load_dataset(source)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        if local:
            raise UserError(f"data.dataset: no images found in {source} ({error}); expected parquet files "
                            "(train-*.parquet, test-*.parquet) or an image folder (split/class/image.png)") from None
        raise UserError(f"data.dataset: could not load {source!r} from the Hugging Face Hub ({error}). Offline? "
                        f"Put a local copy in a folder and set {DATA_ENV} to its parent, or give a local "
                        "path") from None
    except ConnectionError as error:
        raise UserError(f"data.dataset: could not reach the Hub for {source!r} ({error}); set {DATA_ENV} to a "
                        "folder with a local copy, or give a local path") from None
    finally:
        card_logger.setLevel(level)


def _csv_files(source: str) -> dict[str, str]:
    """A CSV-of-paths dataset's files by split: FILE.csv is the train split; a folder's SPLIT.csv files are theirs."""
    path = Path(source)
    if path.is_file() and path.suffix == ".csv":
        return {"train": str(path)}
    return {f.stem: str(f) for f in sorted(path.glob("*.csv"))} if path.is_dir() else {}


def _load_csv(files: dict[str, str], cfg: DataConfig):
    """CSV files with an image path column (relative to the CSV's folder) and a label column (names or ints)."""
    import datasets

    for file in files.values():
        try:  # a plain file of bounded size (a FIFO would hang the reader), with a header and rows
            lines = [line for line in read_regular(file, CSV_LIMIT, "CSV file").splitlines() if line.strip()]
        except UserError as error:
            raise UserError(f"data.dataset: {error}") from None
        if len(lines) < 2:
            raise UserError(f"data.dataset: {file} has {'a header but ' if lines else ''}no rows; write a header "
                            "line (image,label) and one image path and label per line under it")
    dataset = datasets.load_dataset("csv", data_files=files)
    columns = dataset[next(iter(files))].column_names
    image_column = _find_column(columns, cfg.image_column, PATH_COLUMNS, "image_column")
    label_column = _find_column(columns, cfg.label_column, LABEL_COLUMNS, "label_column")
    for split, file in files.items():
        root = Path(file).parent
        for row, value in enumerate(dataset[split][image_column], start=1):
            relative = PurePath(str(value))
            if relative.is_absolute() or ".." in relative.parts:  # a CSV someone shares may not read files elsewhere
                raise UserError(f"data.dataset: {file}, row {row}: the image path {value!r} leaves the CSV's folder; "
                                f"paths are relative to {root} and stay inside it")
        dataset[split] = dataset[split].map(lambda row: {image_column: str(root / str(row[image_column]))})
    dataset = dataset.cast_column(image_column, datasets.Image())
    if any(dataset[split].features[label_column].dtype in ("string", "large_string") for split in dataset):
        # One class list for every split (class_encode_column would number each split on its own).
        names = sorted({str(v) for split in dataset for v in dataset[split][label_column]})
        dataset = dataset.cast_column(label_column, datasets.ClassLabel(names=names))
    return dataset


def _hold_out(train, fraction: float, label_column: str):
    """Train and a held-out test part: stratified by class where every class can give one, with a fixed seed."""
    try:
        parts = train.train_test_split(test_size=fraction, seed=HOLDOUT_SEED, stratify_by_column=label_column)
    except ValueError:  # labels are not a ClassLabel, or a class is too small to stratify
        parts = train.train_test_split(test_size=fraction, seed=HOLDOUT_SEED)
    return parts["train"], parts["test"]


def _find_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], key: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"data.{key}: no column {wanted!r}; the dataset has {', '.join(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise UserError(f"data.{key}: cannot guess the column among {', '.join(columns)}; name it in the recipe")


def _open_image(item: dict, row: int) -> np.ndarray:
    """One encoded image (`datasets.Image(decode=False)`: bytes and/or path) as RGB uint8; the file named if bad.

    A file is read only when it is a plain one of at most IMAGE_LIMIT bytes; an image of more pixels than PIL's
    Image.MAX_IMAGE_PIXELS (89 million) is refused as a likely decompression bomb, not decoded after a warning.
    """
    where = item.get("path") or f"row {row}"
    try:
        encoded = item.get("bytes") or read_regular(item["path"], IMAGE_LIMIT, "dataset image")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(encoded)) as image:
                return np.asarray(image.convert("RGB"))
    except UserError as error:
        raise UserError(f"data.dataset: {error}") from None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise UserError(f"data.dataset: cannot read image {where} ({error}); remove or replace the file") from None


def _decode(split, image_column: str, label_column: str, image_size: int) -> ImageSet:
    """Decodes every image once to RGB uint8; mixed sizes, and images larger than image_size, are resized to it."""
    import datasets

    feature = split.features[label_column]
    class_names = list(getattr(feature, "names", None) or [])
    dtype = str(getattr(feature, "dtype", type(feature).__name__))
    if not dtype.startswith(("int", "uint")):  # float labels would be truncated into classes without a word
        raise UserError(f"data.label_column: column {label_column!r} holds {dtype} values; labels must be integer "
                        "class indices (0, 1, ...) or class names in a ClassLabel column")
    encoded = split.cast_column(image_column, datasets.Image(decode=False))[image_column]
    images = [_open_image(item, row) for row, item in enumerate(encoded)]
    shapes = {img.shape for img in images}
    if len(shapes) > 1 or any(h > image_size or w > image_size for h, w, _ in shapes):
        images = [np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BILINEAR)) for img in images]
    array = np.stack(images).transpose(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(split[label_column]), dtype=torch.int64)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(array)), labels, class_names)


def load_splits(cfg: DataConfig) -> Splits:
    """Loads train (minus a held-out validation tail), optional validation and test splits."""
    source = resolve_source(cfg.dataset)
    csv_files = _csv_files(source)
    dataset = _load_csv(csv_files, cfg) if csv_files else _load_dataset_dict(source)
    # A dataset without a test split (an image folder of classes, one CSV) gets one held out from train.
    carve = cfg.test_split == "test" and cfg.test_split not in dataset and cfg.train_split in dataset
    for key in ("train_split",) if carve else ("train_split", "test_split"):
        if getattr(cfg, key) not in dataset:
            raise UserError(f"data.{key}: split {getattr(cfg, key)!r} does not exist in {source}; "
                            f"available: {', '.join(dataset)}")
    columns = dataset[cfg.train_split].column_names
    image_column = _find_column(columns, cfg.image_column, PATH_COLUMNS if csv_files else IMAGE_COLUMNS,
                                "image_column")
    if cfg.label_column is None and not set(LABEL_COLUMNS) & set(columns) and Path(source).is_dir():
        # `datasets` drops the label of an image folder with a single class sub-folder.
        raise UserError(f"data.dataset: {source} has no label column: an image folder needs one sub-folder per "
                        "class, and at least two classes (other data: name the column in data.label_column)")
    label_column = _find_column(columns, cfg.label_column, LABEL_COLUMNS, "label_column")

    train_split = dataset[cfg.train_split]
    if carve:
        train_split, test_split = _hold_out(train_split, cfg.holdout_fraction, label_column)
        source = f"{source} (test: {cfg.holdout_fraction:g} of {cfg.train_split} held out, seed {HOLDOUT_SEED})"
    else:
        test_split = dataset[cfg.test_split]
    n_keep = len(train_split) - cfg.val_size
    if n_keep < 1:
        raise UserError(f"data.val_size: {cfg.val_size} leaves no training data (train has {len(train_split)})")
    val = None
    if cfg.val_size:
        val = _decode(train_split.select(range(n_keep, len(train_split))), image_column, label_column, cfg.image_size)
    train_rows = range(min(n_keep, cfg.n_train or n_keep))
    train = _decode(train_split.select(train_rows), image_column, label_column, cfg.image_size)
    test_rows = range(min(len(test_split), cfg.n_test or len(test_split)))
    test = _decode(test_split.select(test_rows), image_column, label_column, cfg.image_size)

    train_split_labels = np.asarray(train_split[label_column])  # all of them: a subset may miss the top class
    num_classes = cfg.num_classes or len(train.class_names) or int(train_split_labels.max()) + 1
    splits = Splits(train, val, test, num_classes, source)
    _check_labels(splits, train_split_labels[:n_keep], cfg)
    return splits


def _check_labels(splits: Splits, trained_labels: np.ndarray, cfg: DataConfig) -> None:
    """Labels in [0, num_classes) on every split, before any training; two classes at least; subset sizes met.

    `trained_labels` are those of the train split less its validation tail. A validation or test class they never
    hold is a warning: the model cannot learn it, and its examples count as errors (or lucky guesses).
    """
    for name, part in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        if part is None or not len(part):
            continue
        low, high = int(part.labels.min()), int(part.labels.max())
        if low < 0:
            raise UserError(f"data.dataset: the {name} split holds the label {low}; labels must be class indices "
                            f"in [0, {splits.num_classes})")
        if high >= splits.num_classes:
            raise UserError(f"data.num_classes: the {name} split holds the label {high} but num_classes is "
                            f"{splits.num_classes}; raise data.num_classes or fix the labels")
    classes = np.unique(trained_labels)
    if len(classes) < 2:  # one class: every prediction is right, and "100%" means nothing
        raise UserError(f"data.dataset: the training split {cfg.train_split!r} holds a single class "
                        f"({classes.tolist()}); a classifier needs examples of at least 2 classes")
    for name, part in (("validation", splits.val), ("test", splits.test)):
        unseen = sorted(set(part.labels.tolist()) - set(classes.tolist())) if part is not None else []
        if unseen:
            names = [splits.train.class_names[c] if c < len(splits.train.class_names) else str(c) for c in unseen]
            warnings.warn(f"data.dataset: the {name} split holds {len(unseen)} class(es) that the training split "
                          f"{cfg.train_split!r} has no example of ({', '.join(names[:5])}"
                          f"{', ...' if len(names) > 5 else ''}); the model cannot learn them", stacklevel=3)
    for key, asked, used in (("n_train", cfg.n_train, splits.n_train), ("n_test", cfg.n_test, splits.n_test)):
        if asked is not None and asked > used:
            warnings.warn(f"data.{key}: {asked} examples asked for, but only {used} are available; using {used}",
                          stacklevel=3)


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
