"""MNIST-style datasets as numpy arrays: the full set from torchvision's folder layout, or the
sample bundled with l2fast. numpy only; torchvision is imported by `download` alone.

    <data_dir>/MNIST/raw/train-images-idx3-ubyte[.gz]    uint8 [60000, 28, 28]
    <data_dir>/MNIST/raw/train-labels-idx1-ubyte[.gz]    uint8 [60000]
    <data_dir>/MNIST/raw/t10k-images-idx3-ubyte[.gz]     uint8 [10000, 28, 28]
    <data_dir>/MNIST/raw/t10k-labels-idx1-ubyte[.gz]     uint8 [10000]

(`FashionMNIST/raw/...` for fashion-mnist). Every file is checked: a malformed one raises
DataError with a one-line message that names it. A header claiming another dtype or image shape
than MNIST's, or more examples than the dataset has (MAX_EXAMPLES), is refused before anything is
inflated or allocated.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .contract import MNIST_LABELS
from .errors import DataError
from .idx import read_idx

DATASETS = ("auto", "mnist", "sample", "fashion-mnist")
SAMPLE_DIR = Path(__file__).parent / "data" / "mnist_sample"
_FOLDERS = {"mnist": "MNIST", "sample": "MNIST", "fashion-mnist": "FashionMNIST"}
_FILES = {  # (split, what) -> file name without .gz
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
MAX_EXAMPLES = {"train": 60_000, "test": 10_000}  # MNIST's and Fashion-MNIST's split sizes
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


@dataclass
class MnistData:
    name: str  # "mnist" | "sample" | "fashion-mnist"
    source: str  # human description, including the folder it was read from
    train_images: np.ndarray  # uint8 [N, 28, 28]
    train_labels: np.ndarray  # int64 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list = field(default_factory=lambda: list(MNIST_LABELS))


def raw_dir(name, data_dir="data"):
    """The folder holding the four IDX files of `name` ("sample": the bundled one)."""
    if name == "sample":
        return SAMPLE_DIR / "MNIST" / "raw"
    return Path(data_dir) / _FOLDERS[name] / "raw"


def _find(folder, stem):
    """`stem` or `stem.gz` in folder (the uncompressed one first, as torchvision extracts it)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def is_present(name, data_dir="data"):
    """Whether any of the dataset's files is in data_dir (then all four are expected there)."""
    folder = raw_dir(name, data_dir)
    return any(_find(folder, stem) for stem in _FILES.values())


def _read(folder, stem, ndim_shape, what, max_items):
    path = _find(folder, stem)
    if path is None:
        raise DataError(f"{folder / stem}[.gz]: file not found (expected the {what})")
    expected = " x ".join("N" if d is None else str(d) for d in ndim_shape)
    array = read_idx(path, max_items=max_items, item_shape=ndim_shape[1:], dtype=np.uint8,
                     expected=f"{what} as uint8 [{expected}]")
    return path, array


def _read_split(folder, split):
    images_path, images = _read(folder, _FILES[split, "images"], (None, 28, 28), f"{split} images",
                                MAX_EXAMPLES[split])
    labels_path, labels = _read(folder, _FILES[split, "labels"], (None,), f"{split} labels", MAX_EXAMPLES[split])
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: holds {len(labels)} labels but {images_path.name} holds "
                        f"{len(images)} images (expected the same count)")
    if len(labels) == 0:
        raise DataError(f"{labels_path}: no examples (expected at least one)")
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{labels_path}: label {int(labels[bad])} at index {bad} is outside 0..9")
    return images, labels.astype(np.int64)


def _load(name, folder, describe):
    train_images, train_labels = _read_split(folder, "train")
    test_images, test_labels = _read_split(folder, "test")
    counts = f"{len(train_images):,} train / {len(test_images):,} test"
    return MnistData(name=name, source=describe(counts), train_images=train_images,
                     train_labels=train_labels, test_images=test_images, test_labels=test_labels,
                     classes=list(FASHION_CLASSES if name == "fashion-mnist" else MNIST_LABELS))


def load_dataset(name="auto", data_dir="data"):
    """Read a dataset; see the module docstring. `auto`: full MNIST if present, else the sample."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (expected one of {', '.join(DATASETS)})")
    data_dir = Path(data_dir)
    if name == "auto":
        if is_present("mnist", data_dir):
            name = "mnist"
        else:
            data = load_dataset("sample")
            data.source += f"; no full MNIST in {raw_dir('mnist', data_dir)}, use --download to fetch it"
            return data
    folder = raw_dir(name, data_dir)
    if name == "sample":
        return _load(name, folder, lambda counts: (
            f"{counts} real MNIST digits bundled with l2fast; {folder}"))
    if not is_present(name, data_dir):
        raise DataError(f"{folder}: no {_FOLDERS[name]} files there (expected {_FILES['train', 'images']}"
                        f"[.gz] and the 3 others); fetch them with --download, or use --dataset sample")
    label = "Fashion-MNIST" if name == "fashion-mnist" else "MNIST"
    return _load(name, folder, lambda counts: f"{counts} {label} images from {folder}")


def download(name, data_dir="data"):
    """Fetch the full dataset with torchvision into torchvision's layout under data_dir."""
    if name == "auto":
        name = "mnist"
    if name not in ("mnist", "fashion-mnist"):
        raise DataError(f"nothing to download for dataset {name!r} (expected mnist or fashion-mnist)")
    try:
        from torchvision import datasets
    except ImportError as e:
        raise DataError(f"downloading needs torchvision ({e})") from None
    cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
    try:
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except (RuntimeError, OSError) as e:  # torchvision raises RuntimeError after trying every mirror
        reason = " ".join(str(e).split())
        if len(reason) > 300:
            reason = reason[:300] + "..."
        raise DataError(f"could not download {cls.__name__} into {raw_dir(name, data_dir)}: {reason} "
                        f"(check the network, or put the 4 IDX files there by hand)") from None
    return raw_dir(name, data_dir)
