"""`python -m l2fast.infer MODEL.onnx INPUT...`: classify digits with onnxruntime alone (no torch).

Inputs, any mix of:
  * image files (PNG, JPEG, anything Pillow decodes; any size). The recipe, also in `load_image`:
    1. Pillow `convert("L")` to 8-bit grayscale (transparency is flattened onto white first);
    2. polarity: the model wants MNIST's white digit on black. `--background black` (the default)
       takes the image as is, `--background white` (alias `--invert`) inverts it, `--background
       auto` inverts when the mean of the image's 1-pixel border is above 127 (a light background);
    3. size (`--fit`): `mnist` crops the digit's bounding box (the pixels above FIT_THRESHOLD = 64
       after step 2, so JPEG noise and faint smudges do not count), scales it with Pillow's LANCZOS filter so its longer side is 20 px keeping the
       aspect ratio, and pastes it into a black 28x28 image so that its center of mass sits at the
       center (MNIST's own recipe); `stretch` resizes the whole image to 28x28 with LANCZOS,
       ignoring the aspect ratio; `none` requires a 28x28 image; `auto` (default) uses a 28x28
       image unchanged and `mnist` for any other size.
  * `.npy` arrays of shape [N,28,28] or [N,1,28,28]: uint8 0..255, or float16/32/64 in [0,1]; taken
    as white-on-black unless `--background white` (then inverted; `auto` decides per image).
  * IDX image files (MNIST's format, e.g. t10k-images-idx3-ubyte[.gz]): uint8 [N,28,28].

Every image becomes float32 [1,28,28] = uint8 / 255 (no mean/std normalization), they are batched
(`--batch-size`), and the ONNX model's logits go through a softmax.

Output: one line per image on stdout, `NAME: LABEL (p=0.9987)`, with `--top-k K` the K best as
`LABEL (p=...)` separated by ` | `. NAME is the file, or `file[i]` for the i-th image of an array.
`--json` prints JSON Lines instead: one object per image, `{"input", "index", "class", "label",
"probability", "top_k": [{"class", "label", "probability"}...]}`, and `{"input", "error"}` for an
input that could not be read. The execution provider that ran (CUDA when onnxruntime offers it,
else CPU) is printed on stderr, never on stdout.

When `manifest.json` (written by `python -m l2fast.export`) sits beside the model, the model file's
sha256 must match the manifest's, and the manifest's class labels are used.

Exit codes: 0 all inputs predicted; 1 one or more inputs could not be read (the others were still
predicted and printed); 2 usage or model error (bad option; missing, truncated or non-ONNX model;
sha256 mismatch with manifest.json). Errors are one line on stderr, no traceback.

Python API (no torch either):

    from l2fast.infer import Predictor
    p = Predictor("export/model.onnx", threads=1)
    classes, probabilities = p.predict(images)   # images: uint8 [N,28,28] or float [N,1,28,28]
    # classes int64 [N], probabilities float32 [N,10]; p.labels maps a class to its label
"""
import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._cli import CLIError, run
from .idx import IDXError, parse_idx

IMAGE_SIZE = 28
FIT_BOX = 20  # MNIST: the digit's bounding box is scaled to fit 20x20, then centered in 28x28
FIT_THRESHOLD = 64  # pixels above this (after polarity) belong to the digit's bounding box; 64 ignores JPEG noise
MANIFEST_NAME = "manifest.json"
DEFAULT_BATCH = 1024
_NPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"


class ModelError(CLIError):
    """The model file is missing, unreadable, not ONNX, not the l2fast contract, or corrupted."""


class InputError(ValueError):
    """One input cannot be used; the message names the file and what was expected."""


class Prediction(NamedTuple):
    """`classes` int64 [N] (argmax), `probabilities` float32 [N, C] (softmax of the logits)."""

    classes: np.ndarray
    probabilities: np.ndarray

    def top_k(self, k):
        """(classes int64 [N,k], probabilities float32 [N,k]), best first."""
        k = max(1, min(int(k), self.probabilities.shape[1]))
        idx = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return idx.astype(np.int64), np.take_along_axis(self.probabilities, idx, axis=1)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(model_path):
    """The manifest beside the model (None if there is none); checks the model's sha256 against it.

    Raises ModelError when the manifest is unreadable or the model file does not match it.
    Returns (manifest or None, note or None) where the note explains a check that could not be made.
    """
    model_path = Path(model_path)
    mpath = model_path.parent / MANIFEST_NAME
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
        return manifest, (f"{mpath} lists no {model_path.name}; its sha256 was not checked")
    actual = sha256_file(model_path)
    if actual != entry["sha256"]:
        raise ModelError(f"{model_path}: sha256 {actual[:16]}... does not match {mpath.name}'s "
                         f"{str(entry['sha256'])[:16]}...: the file is corrupted or was replaced "
                         f"(re-export it with python -m l2fast.export)")
    return manifest, None


def default_providers():
    """CUDA first when this onnxruntime build offers it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class Predictor:
    """An onnxruntime session on an l2fast ONNX export; no torch involved.

    path: the .onnx file. threads: intra-op threads (None: onnxruntime's default, one per
    physical core). providers: onnxruntime execution providers (None: CUDA if available, else
    CPU). verify_manifest: check the sha256 against a `manifest.json` beside the model.
    """

    def __init__(self, path, threads=None, providers=None, verify_manifest=True):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder" if self.path.is_dir() else "not found"
            raise ModelError(f"{self.path}: model file {what} (expected an .onnx file from python -m l2fast.export)")
        self.manifest, self.manifest_note = read_manifest(self.path) if verify_manifest else (None, None)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: no warnings about unused initializers etc.
        if threads is not None:
            if int(threads) < 1:
                raise CLIError(f"threads={threads}: expected a positive number")
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        self.threads = threads
        providers = list(providers) if providers is not None else default_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # InvalidProtobuf, Fail, InvalidGraph, NoSuchFile...: all "not a usable model"
            reason = " ".join(str(e).split())
            raise ModelError(f"{self.path}: not a valid ONNX model ({reason[:240]}); "
                             f"expected an .onnx file from python -m l2fast.export") from None
        self.provider = self.session.get_providers()[0]
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelError(f"{self.path}: {len(inputs)} inputs / {len(outputs)} outputs, expected 1 image input")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        shape = list(inputs[0].shape)
        if len(shape) != 4 or shape[1:] != [1, IMAGE_SIZE, IMAGE_SIZE] or inputs[0].type != "tensor(float)":
            raise ModelError(f"{self.path}: input {self.input_name!r} is {inputs[0].type} {shape}, "
                             f"expected float32 [batch, 1, 28, 28]")
        oshape = list(outputs[0].shape)
        if len(oshape) != 2 or not isinstance(oshape[1], int):
            raise ModelError(f"{self.path}: output {self.output_name!r} has shape {oshape}, expected [batch, classes]")
        self.n_classes = oshape[1]
        self._batch_dynamic = not isinstance(shape[0], int)
        self._fixed_batch = None if self._batch_dynamic else shape[0]
        classes = (self.manifest or {}).get("classes")
        if isinstance(classes, list) and len(classes) == self.n_classes:
            self.labels = [str(c) for c in classes]
        else:
            self.labels = [str(i) for i in range(self.n_classes)]

    def logits(self, array):
        """float32 logits [N, C] for images as `to_model_input` accepts them."""
        x = to_model_input(array)
        if self._fixed_batch is not None and len(x) != self._fixed_batch:
            if self._fixed_batch != 1:
                raise ModelError(f"{self.path}: fixed batch size {self._fixed_batch}, got {len(x)} images")
            return np.concatenate([self.logits(x[i:i + 1]) for i in range(len(x))])
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def predict(self, array):
        """Prediction(classes int64 [N], probabilities float32 [N, C]) for uint8 [N,28,28]/[N,1,28,28] in 0..255
        or float [N,28,28]/[N,1,28,28] in [0, 1]."""
        return predictions_from_logits(self.logits(array))


def softmax(logits):
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def predictions_from_logits(logits):
    probs = softmax(logits)
    return Prediction(probs.argmax(axis=1).astype(np.int64), probs)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

def validate_batch(array, name="array"):
    """uint8 0..255 or float in [0,1], shape [N,28,28] or [N,1,28,28] -> float32 [N,1,28,28] in [0,1].

    Raises InputError naming `name` and what was expected.
    """
    array = np.asarray(array)
    expected = "[N,28,28] or [N,1,28,28] images, uint8 0..255 or float 0..1"
    ok_shape = (array.ndim == 3 and array.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE)) or \
               (array.ndim == 4 and array.shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE))
    if not ok_shape:
        raise InputError(f"{name}: shape {list(array.shape)} {array.dtype}, expected {expected}")
    if array.dtype == np.uint8:
        x = array.astype(np.float32) / np.float32(255.0)
    elif array.dtype in (np.float16, np.float32, np.float64):
        x = array.astype(np.float32)
        if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
            lo, hi = (float(np.nanmin(x)), float(np.nanmax(x))) if np.isfinite(x).any() else (float("nan"),) * 2
            raise InputError(f"{name}: float values span [{lo:g}, {hi:g}]"
                             f"{' with NaN/inf' if not np.isfinite(x).all() else ''}, expected {expected}")
    else:
        raise InputError(f"{name}: dtype {array.dtype} (shape {list(array.shape)}), expected {expected}")
    return np.ascontiguousarray(x.reshape(len(x), 1, IMAGE_SIZE, IMAGE_SIZE))


to_model_input = validate_batch


def _needs_invert(gray, background):
    """Whether a grayscale uint8 [H,W] image must be inverted to become white-on-black."""
    if background == "black":
        return False
    if background == "white":
        return True
    border = np.concatenate([gray[0, :], gray[-1, :], gray[1:-1, 0], gray[1:-1, -1]]) if min(gray.shape) > 1 \
        else gray.ravel()
    return float(border.astype(np.float64).mean()) > 127.5


def fit_mnist(gray):
    """uint8 [H,W] white-on-black -> uint8 [28,28]: bounding box into 20x20 (aspect kept), centered by mass."""
    from PIL import Image

    mask = gray > FIT_THRESHOLD
    if not mask.any():
        return np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = FIT_BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.uint8)
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float64)
    weights = small.astype(np.float64)
    total = weights.sum()
    if total > 0:
        cy = (weights.sum(axis=1) * np.arange(nh)).sum() / total
        cx = (weights.sum(axis=0) * np.arange(nw)).sum() / total
    else:
        cy, cx = (nh - 1) / 2, (nw - 1) / 2
    center = (IMAGE_SIZE - 1) / 2
    top = int(np.clip(round(center - cy), 0, IMAGE_SIZE - nh))
    left = int(np.clip(round(center - cx), 0, IMAGE_SIZE - nw))
    canvas[top:top + nh, left:left + nw] = weights
    return canvas.astype(np.uint8)


def load_image(path, background="black", fit="auto"):
    """An image file -> uint8 [28,28] white digit on black, by the recipe in the module docstring."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise InputError(f"{path}: reading image files needs Pillow ({e}); pip install pillow") from None
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                flat.alpha_composite(rgba)
                im = flat
            gray = np.asarray(im.convert("L"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise InputError(f"{path}: cannot decode it as an image (expected PNG/JPEG/... , a .npy array "
                         f"or an IDX file)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: cannot decode the image ({' '.join(str(e).split())[:200]}); "
                         f"expected a complete image file (PNG, JPEG, ...)") from None
    if gray.size == 0:
        raise InputError(f"{path}: empty image")
    if _needs_invert(gray, background):
        gray = 255 - gray
    if fit == "auto":
        fit = "none" if gray.shape == (IMAGE_SIZE, IMAGE_SIZE) else "mnist"
    if fit == "mnist":
        return fit_mnist(gray)
    if fit == "stretch":
        if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
            return gray
        return np.asarray(Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS),
                          dtype=np.uint8)
    if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"{path}: {gray.shape[1]}x{gray.shape[0]} pixels, expected 28x28 with --fit none")
    return gray


def _apply_background(x, background, name):
    """Polarity for float [N,1,28,28] arrays in [0,1]: 'white' inverts, 'auto' decides per image."""
    if background == "black":
        return x
    if background == "white":
        return 1.0 - x
    out = x.copy()
    for i in range(len(x)):
        if _needs_invert((x[i, 0] * 255.0), "auto"):
            out[i] = 1.0 - x[i]
    return out


def _read_head(path, n=8):
    with open(path, "rb") as f:
        return f.read(n)


def load_input(path, background="black", fit="auto"):
    """One input file -> (float32 [N,1,28,28] in [0,1], names [N]); raises InputError."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise InputError(f"{name}: file not found")
    if path.is_dir():
        raise InputError(f"{name}: is a folder, expected an image, .npy or IDX file")
    try:
        head = _read_head(path)
    except OSError as e:
        raise InputError(f"{name}: cannot read it ({e.strerror or e})") from None
    if head.startswith(_NPY_MAGIC) or path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"{name}: not a readable .npy array ({' '.join(str(e).split())[:200]}); "
                             f"expected one array saved with numpy.save") from None
        if not isinstance(array, np.ndarray):
            raise InputError(f"{name}: holds several arrays (.npz), expected one .npy array")
        x = _apply_background(validate_batch(array, name), background, name)
        return x, [f"{name}[{i}]" for i in range(len(x))]
    if head.startswith(_GZIP_MAGIC) or (len(head) >= 4 and head[:2] == b"\0\0"):
        try:
            raw = path.read_bytes()
            if head.startswith(_GZIP_MAGIC):
                raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise InputError(f"{name}: cannot decompress it as gzip ({e}); expected a gzipped IDX image file") from None
        try:
            array = parse_idx(raw, name)
        except IDXError as e:
            raise InputError(f"{e}; expected an IDX image file, uint8 [N,28,28]") from None
        x = _apply_background(validate_batch(array, name), background, name)
        return x, [f"{name}[{i}]" for i in range(len(x))]
    gray = load_image(path, background, fit)
    return validate_batch(gray[None], name), [name]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m l2fast.infer",
        description="Classify 28x28 digits with an ONNX model exported by python -m l2fast.export, "
                    "using onnxruntime only (no torch).",
        epilog="Exit codes: 0 all predicted, 1 some inputs failed (others still printed), 2 usage or model error.")
    p.add_argument("model", metavar="MODEL.onnx", help="the exported model (manifest.json beside it is checked)")
    p.add_argument("inputs", metavar="INPUT", nargs="+",
                   help="PNG/JPEG images, .npy arrays [N,28,28]/[N,1,28,28] (uint8 or float 0..1), IDX image files")
    p.add_argument("--json", action="store_true", help="JSON Lines on stdout: one object per image (or per failed input)")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="also show the K most likely classes (default 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="N",
                   help=f"images per onnxruntime call (default {DEFAULT_BATCH})")
    p.add_argument("--background", choices=("black", "white", "auto"), default="black",
                   help="black: white digit on black like MNIST (default); white: dark digit on light, inverted; "
                        "auto: decide per image from its border pixels")
    p.add_argument("--invert", action="store_const", const="white", dest="background",
                   help="same as --background white")
    p.add_argument("--fit", choices=("auto", "mnist", "stretch", "none"), default="auto",
                   help="how image files become 28x28: mnist = bounding box into 20x20 centered by mass; stretch = "
                        "resize whole image; none = must already be 28x28; auto (default) = none for 28x28 "
                        "images, else mnist")
    p.add_argument("--cpu", action="store_true", help="use the CPU provider even if CUDA is available")
    return p


def _format_line(name, classes, probs, labels):
    parts = [f"{labels[c]} (p={p:.4f})" for c, p in zip(classes, probs)]
    return f"{name}: " + " | ".join(parts)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise CLIError(f"--top-k {args.top_k}: expected 1 or more")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size}: expected 1 or more")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads {args.threads}: expected 1 or more")
    predictor = Predictor(args.model, threads=args.threads,
                          providers=["CPUExecutionProvider"] if args.cpu else None)
    threads = f", {args.threads} intra-op threads" if args.threads else ""
    print(f"{predictor.path}: onnxruntime {predictor.provider}{threads}", file=sys.stderr)
    if predictor.manifest_note:
        print(f"note: {predictor.manifest_note}", file=sys.stderr)

    failed = 0
    out = sys.stdout
    k = min(args.top_k, predictor.n_classes)
    pending, pending_names = [], []

    def flush():
        if not pending:
            return
        x = np.concatenate(pending)
        names = list(pending_names)
        pending.clear()
        pending_names.clear()
        for i in range(0, len(x), args.batch_size):
            pred = predictor.predict(x[i:i + args.batch_size])
            top_c, top_p = pred.top_k(k)
            for j in range(len(top_c)):
                name = names[i + j]
                if args.json:
                    src, _, idx = name.rpartition("[") if name.endswith("]") else (name, "", "")
                    rec = {"input": src if idx else name, "index": int(idx[:-1]) if idx else None,
                           "class": int(top_c[j, 0]), "label": predictor.labels[top_c[j, 0]],
                           "probability": float(top_p[j, 0]),
                           "top_k": [{"class": int(c), "label": predictor.labels[c], "probability": float(p)}
                                     for c, p in zip(top_c[j], top_p[j])]}
                    out.write(json.dumps(rec) + "\n")
                else:
                    out.write(_format_line(name, top_c[j], top_p[j], predictor.labels) + "\n")
        out.flush()

    for path in args.inputs:
        try:
            x, names = load_input(path, args.background, args.fit)
        except InputError as e:
            failed += 1
            flush()  # keep output in input order
            print(f"error: {e}", file=sys.stderr)
            if args.json:
                out.write(json.dumps({"input": str(path), "error": str(e)}) + "\n")
            continue
        pending.append(x)
        pending_names.extend(names)
        if sum(len(p) for p in pending) >= args.batch_size:
            flush()
    flush()
    if failed:
        print(f"error: {failed} of {len(args.inputs)} inputs could not be read", file=sys.stderr)
        return 1
    return 0


def cli(argv=None):
    try:
        return run(main, argv, user_errors=(InputError,))
    except BrokenPipeError:  # `... | head`: the reader left; not an error worth a traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(cli())
