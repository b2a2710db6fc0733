"""Shared fixtures: tiny datasets in the Hub's parquet layout, and the real CIFAR-10 when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_parquet_dataset(folder: Path, n_train: int = 64, n_test: int = 32, num_classes: int = 10, seed: int = 0) -> Path:
    """Writes `train-00000-of-00001.parquet` and `test-...` with `img` (PNG) and `label` (ClassLabel) columns."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES[:num_classes])})
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, num_classes, n)
        # Class-dependent colour so tiny models can learn something.
        base = (labels[:, None, None, None] * 25 + rng.integers(0, 40, (n, 32, 32, 3))).clip(0, 255).astype(np.uint8)
        images = [Image.fromarray(img) for img in base]
        data = datasets.Dataset.from_dict({"img": images, "label": labels.tolist()}, features=features)
        data.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("data") / "tiny_cifar")


def real_data_root() -> Path | None:
    """The folder holding `cifar10/` (SGLR_ZOO_DATA, else ../shared/datasets beside the repo), or None."""
    root = Path(os.environ.get("SGLR_ZOO_DATA", REPO.parent / "shared" / "datasets"))
    return root if (root / "cifar10").is_dir() else None


@pytest.fixture(scope="session")
def real_cifar10() -> Path:
    root = real_data_root()
    if root is None:
        if os.environ.get("SGLR_ZOO_REQUIRE_REAL_DATA"):
            pytest.fail("SGLR_ZOO_REQUIRE_REAL_DATA is set but no cifar10/ under SGLR_ZOO_DATA")
        pytest.skip("real CIFAR-10 not found (set SGLR_ZOO_DATA to the folder holding cifar10/)")
    return root / "cifar10"
