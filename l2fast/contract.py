"""The serving contract between export and inference, torch-free: one definition of each.

Export writes it (model.onnx's input/output, manifest.json), inference reads it. Names, the image
shape and dtype, the labels, the artifact file names, the preprocessing, the manifest and the
sha256 of an artifact live here and nowhere else.
"""
import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import InputError, ModelError

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
IMAGE_SIZE = 28
IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)  # one image as the model takes it: [1, 28, 28]
N_CLASSES = 10
MNIST_LABELS = [str(d) for d in range(N_CLASSES)]  # what the model's logits mean by default

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
PT2_FILE = "model.pt2"
MANIFEST_FILE = "manifest.json"
ARTIFACTS = (ONNX_FILE, TORCHSCRIPT_FILE, PT2_FILE)
MANIFEST_FORMAT = 1

PREPROCESSING = {
    "description": ("A raw image is a 28x28 grayscale uint8 array, 0..255, white digit (255) on a black "
                    "background (0), as in MNIST. Convert to float32, divide by 255 (no mean/std "
                    "normalization) and reshape to [N, 1, 28, 28]."),
    "source": {"dtype": "uint8", "shape": [IMAGE_SIZE, IMAGE_SIZE], "range": [0, 255],
               "foreground": "white (high values)", "background": "black (0)"},
    "steps": ["x = image.astype(float32) / 255", "x = x.reshape(N, 1, 28, 28)"],
    "scale": 1.0 / 255.0,
    "normalization": None,
    "images_of_other_sizes": ("python -m l2fast.infer converts PNG/JPEG files: grayscale, invert if the "
                              "background is light, fit the digit's bounding box into 20x20 keeping "
                              "aspect and center it by center of mass in 28x28 (MNIST's recipe)"),
}

_255 = np.float32(255.0)
_UINT8 = np.dtype(np.uint8)  # usually the very object an array holds: `is` first, the cheap test
EXPECTED_IMAGES = "[N,28,28] or [N,1,28,28] images (or one [28,28]), uint8 0..255 or float 0..1"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_images(shape, dtype, name="images"):
    """The number of images in an array of `shape` and `dtype` that to_model_input takes: one [28, 28]
    or a batch [N, 28, 28] / [N, 1, 28, 28], uint8 or float16/32/64 (any byte order). Raises
    InputError naming `name` and what was expected; callers check a file's header with it before
    reading the file."""
    if shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE) or not (
            len(shape) == 2 or len(shape) == 3 or (len(shape) == 4 and shape[1] == 1)):
        raise InputError(f"{name}: shape {list(shape)} {dtype}, expected {EXPECTED_IMAGES}")
    if not (dtype is _UINT8 or dtype == _UINT8 or (dtype.kind == "f" and dtype.itemsize in (2, 4, 8))):
        raise InputError(f"{name}: dtype {dtype} (shape {list(shape)}), expected {EXPECTED_IMAGES}")
    return 1 if len(shape) == 2 else shape[0]


def to_model_input(images, name="images"):
    """Images -> float32 [N, 1, 28, 28] in [0, 1], the model's input; the documented preprocessing.

    Accepts what check_images accepts, uint8 in 0..255 (divided by 255) or float in [0, 1]. Raises
    InputError naming `name` and what was expected.
    """
    array = images if type(images) is np.ndarray else np.asarray(images)
    n = check_images(array.shape, array.dtype, name)
    if array.dtype is _UINT8 or array.dtype == _UINT8:
        # astype + in-place division: at batch 1 ~0.5 µs cheaper than one mixed-type ufunc, as fast at 1024.
        x = array.astype(np.float32)
        x /= _255
        return x.reshape(n, *IMAGE_SHAPE)
    x = array.astype(np.float32, copy=False)
    lo, hi = (x.min(), x.max()) if x.size else (0.0, 0.0)
    if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both comparisons
        finite = np.isfinite(x)
        lo, hi = (float(x[finite].min()), float(x[finite].max())) if finite.any() else (float("nan"),) * 2
        raise InputError(f"{name}: float values span [{lo:g}, {hi:g}]"
                         f"{' with NaN/inf' if not finite.all() else ''}, expected {EXPECTED_IMAGES}")
    return np.ascontiguousarray(x).reshape(n, *IMAGE_SHAPE)


def manifest_path(model_path):
    return Path(model_path).parent / MANIFEST_FILE


def write_manifest(folder, manifest):
    """Write `manifest` as folder/manifest.json (the caller publishes the folder atomically)."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_manifest(model_path):
    """The manifest beside a model file, its sha256 checked: (manifest or None, note or None).

    None when there is no manifest. The note explains a check that could not be made. Raises
    ModelError when the manifest is unreadable or the model file does not match it.
    """
    model_path = Path(model_path)
    mpath = manifest_path(model_path)
    if not mpath.is_file():
        return None, None
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        artifacts = manifest["artifacts"]
        if not isinstance(artifacts, dict):
            raise TypeError("artifacts is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{mpath}: not a readable l2fast export manifest ({e}); "
                         f"remove it or re-export with python -m l2fast.export") from None
    entry = artifacts.get(model_path.name)
    if not isinstance(entry, dict) or "sha256" not in entry:
        return manifest, f"{mpath} lists no {model_path.name}; its sha256 was not checked"
    actual = sha256_file(model_path)
    if actual != entry["sha256"]:
        raise ModelError(f"{model_path}: sha256 {actual[:16]}... does not match {mpath.name}'s "
                         f"{str(entry['sha256'])[:16]}...: the file is corrupted or was replaced "
                         f"(re-export it with python -m l2fast.export)")
    return manifest, None


def labels_from_manifest(manifest, n_classes):
    """The manifest's class labels when they fit the model's outputs, else the class indices."""
    classes = (manifest or {}).get("classes")
    if isinstance(classes, list) and len(classes) == n_classes:
        return [str(c) for c in classes]
    return [str(i) for i in range(n_classes)]
