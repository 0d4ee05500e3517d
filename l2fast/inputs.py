"""Inference inputs -> batches of MNIST-like digits: image files, .npy arrays, IDX files; torch-free.

`iter_batches(path, ...)` yields `Batch(images, start)` chunks of at most `batch_size` images, so a
file of any size goes through the model with bounded memory: .npy and IDX files are read chunk by
chunk after their headers were checked against the file's real size (a gzipped IDX is inflated
incrementally, through `l2fast.idx.IDXReader`). `images` is the model's input, float32
[n,1,28,28] in [0, 1] (`l2fast.contract.to_model_input`'s), white digit on black. Problems raise
InputError naming the file; a problem found while reading (a cut gzip stream) is raised after the
chunks before it were yielded.
Only regular files are read (symlinks followed): a FIFO, a device or a folder is refused at once,
never waited on.

Image files (PNG, JPEG, TIFF, anything Pillow decodes), `load_image`; an image of more than
MAX_IMAGE_PIXELS pixels is refused from its header, before anything is decoded:
  1. grayscale at the image's real bit depth: 8-bit as is; 16-bit (PNG, TIFF) divided by 65535; a
     32-bit integer image by the depth its values use (8, 16 or 32 bits); a float image in [0, 1]
     times 255 (0..255 taken as is). Transparency is composited onto black when the opaque pixels
     are light and onto white when they are dark, so the digit stays visible;
  2. polarity (`background`): the model wants MNIST's white digit on black. `auto` (the default)
     inverts when the mean of the 1-pixel border is above 127.5 (a light background); `black`
     takes the image as is; `white` inverts it;
  3. size (`fit`): `mnist` crops the digit's bounding box (pixels above FIT_THRESHOLD after step 2),
     scales it with LANCZOS so its longer side is 20 px, aspect kept, and pastes it into a black
     28x28 image with its center of mass at pixel (14, 14) (MNIST's recipe); `stretch` resizes the
     whole image to 28x28; `none` requires 28x28; `auto` (default): `none` for a 28x28 image whose
     digit already sits as MNIST's do (`looks_like_mnist`), else `mnist`.
  A FitWarning (a UserWarning) says when the result looks wrong: no digit left, most of the image
  foreground (wrong polarity?), or a light border kept with `background="black"`.
Arrays (.npy [N,28,28]/[N,1,28,28]/[28,28], uint8 or float in [0,1]; IDX uint8 [N,28,28]) are taken
as MNIST-like; `background` applies per image the same way.
"""
import math
import os
import stat
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from .contract import EXPECTED_IMAGES, IMAGE_SIZE, check_images, to_model_input
from .errors import InputError
from .idx import IDXError, IDXReader

FIT_BOX = 20  # MNIST: the digit's bounding box is scaled to fit 20x20, then centered in 28x28
FIT_THRESHOLD = 64  # pixels above this (after polarity) belong to the digit; 64 ignores JPEG noise
# Where MNIST puts a digit's centre of mass: within half a pixel of pixel (14, 14) (measured on the
# bundled sample's 10,000 digits: 13.50..14.50 on both axes), not the image's middle, 13.5.
MNIST_CENTER = 14.0
# What `fit="auto"` takes as already fitted: a bounding box whose longer side is MNIST_BOX px (the
# sample's: 16..20 at FIT_THRESHOLD, 20 for 99.85%), a centre of mass within MNIST_CENTER_SLACK px
# of MNIST_CENTER on each axis (the sample's: within 0.5).
MNIST_BOX = (16, FIT_BOX)
MNIST_CENTER_SLACK = 1.0
BACKGROUNDS = ("auto", "black", "white")
FITS = ("auto", "mnist", "stretch", "none")
DEFAULT_BATCH = 1024
# The most pixels an image file may have (an 8000x6000 photo fits): checked from its header before
# decoding, since Pillow alone would decode up to 179 Mpx. Decoding, Pillow's image included, peaks
# at about 7 bytes a pixel for 8-bit images and 12 for 32-bit or float ones (measured at 16 Mpx),
# so at most about 0.6 GB.
MAX_IMAGE_PIXELS = 50_000_000
_CONVERT_PIXELS = 1 << 18
_PIXELS = IMAGE_SIZE * IMAGE_SIZE
_NPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"
_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


class FitWarning(UserWarning):
    """An image was read, but what the model will see probably is not a digit as MNIST draws it."""


class Batch(NamedTuple):
    images: np.ndarray  # the model's input: float32 [n,1,28,28] in [0,1], white digit on black
    start: Optional[int]  # index of images[0] within the input; None for an image file (one image)


# ------------------------------------------------------------------------------------ files

def open_regular(path):
    """`path` opened for binary reading; InputError for what is not a regular file (symlinks are
    followed). Opened without blocking and checked on the open descriptor: open() alone would wait
    forever on a FIFO that nobody writes to."""
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InputError(f"{name}: file not found") from None
    except OSError as e:
        raise InputError(f"{name}: cannot read it ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InputError(f"{name}: is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}; expected a regular "
                         f"file (an image, a .npy array or an IDX file)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


# ------------------------------------------------------------------------------------ polarity

def border_means(images):
    """Mean of each image's 1-pixel border, in the images' own units: [n,28,28] (or [n,1,28,28]) -> [n]."""
    x = images.reshape(len(images), IMAGE_SIZE, IMAGE_SIZE)
    total = (x[:, 0, :].sum(1, dtype=np.float64) + x[:, -1, :].sum(1, dtype=np.float64)
             + x[:, 1:-1, 0].sum(1, dtype=np.float64) + x[:, 1:-1, -1].sum(1, dtype=np.float64))
    return total / (4 * IMAGE_SIZE - 4)


def apply_background(images, background):
    """White-on-black images for a chunk of uint8 (0..255) or float (0..1) images; `auto` decides per image."""
    if background == "black":
        return images
    top = 255 if images.dtype == np.uint8 else 1.0
    if background == "white":
        return top - images
    flip = border_means(images) > top / 2
    if flip.any():
        images = images.copy()
        images[flip] = top - images[flip]
    return images


def _gray_needs_invert(gray):
    h, w = gray.shape
    if min(h, w) > 1:  # the 1-pixel border alone: converting the whole image would cost 8 bytes a pixel
        border = np.concatenate([gray[0, :], gray[-1, :], gray[1:-1, 0], gray[1:-1, -1]])
    else:
        border = gray.ravel()
    mean = float(border.mean(dtype=np.float64))
    return mean > 127.5, mean


# ------------------------------------------------------------------------------------ image files

def _row_blocks(shape):
    """Slices of rows of about _CONVERT_PIXELS pixels: per-pixel float math runs one block at a time,
    so its temporaries stay a few MB whatever the image's size."""
    step = max(1, _CONVERT_PIXELS // max(1, shape[1]))
    return [slice(r, r + step) for r in range(0, shape[0], step)]


def _to_uint8(values, convert):
    """uint8 image of values' shape: convert(float64 block) for each block of rows."""
    out = np.empty(values.shape, np.uint8)
    for rows in _row_blocks(values.shape):
        out[rows] = convert(values[rows].astype(np.float64))
    return out


def _scale(values, bits):
    top = 2 ** bits - 1
    return _to_uint8(values, lambda v: np.rint(np.clip(v, 0, top) * (255.0 / top)))


def _composite(im):
    """An image with transparency -> uint8 grayscale: its ink (what is opaque) on the background it
    contrasts with, so that the digit stays visible. Two 1-byte planes besides Pillow's own image."""
    rgba = im if im.mode == "RGBA" else im.convert("RGBA")
    lum = np.asarray(rgba.convert("L"))  # ITU-R 601-2 luma of the colour, alpha left out
    alpha = np.asarray(rgba.getchannel("A"))
    del rgba
    ink_sum = sum(float(np.dot(lum[rows].ravel().astype(np.float64), alpha[rows].ravel().astype(np.float64)))
                  for rows in _row_blocks(lum.shape))
    opacity = int(alpha.sum(dtype=np.uint64))
    ink = ink_sum / opacity if opacity else 0.0  # mean luma of the ink, weighted by opacity
    background = 0.0 if ink > 127.5 else 255.0
    out = np.empty(lum.shape, np.uint8)
    for rows in _row_blocks(lum.shape):
        a = alpha[rows] / 255.0
        out[rows] = np.rint(lum[rows] * a + background * (1.0 - a))
    return out


def _to_gray(im, path):
    """A decoded Pillow image -> uint8 [H,W] grayscale, by its real bit depth and with transparency
    kept. Besides Pillow's image, it costs one copy of the pixels in their own type and a 1-byte
    result: float math runs a block of rows at a time."""
    mode = im.mode
    if mode.startswith("I;16"):
        return _scale(np.asarray(im), 16)
    if mode == "I":
        values = np.asarray(im)
        bps = getattr(im, "tag_v2", {}).get(258, 32)  # TIFF BitsPerSample; a PNG in mode I has 16
        declared = 16 if im.format == "PNG" else int(bps[0] if isinstance(bps, tuple) else bps)
        top = int(values.max()) if values.size else 0
        bits = declared if declared < 32 else next(b for b in (8, 16, 32) if top < 2 ** b)
        low = int(values.min()) if values.size else 0
        if low < 0:
            warnings.warn(f"{path}: negative pixel values (down to {low}) read as 0", FitWarning, stacklevel=3)
        return _scale(values, bits)
    if mode == "F":
        values = np.asarray(im)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (lo >= 0 and hi <= 255):  # NaN fails both comparisons
            finite = np.isfinite(values)
            lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (np.nan, np.nan)
            raise InputError(f"{path}: float image values span [{lo:g}, {hi:g}]"
                             f"{' with NaN/inf' if not finite.all() else ''}; expected 0..1 (or 0..255)")
        factor = 255.0 if hi <= 1.0 else 1.0
        return _to_uint8(values, lambda v: np.rint(v * factor))
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        return _composite(im)
    return np.asarray(im if mode == "L" else im.convert("L"), dtype=np.uint8)


def _check_pixels(size, path):
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{path}: {width}x{height} pixels ({width * height:,}), more than the "
                         f"{MAX_IMAGE_PIXELS:,} l2fast decodes (l2fast.inputs.MAX_IMAGE_PIXELS); expected a "
                         f"smaller image: scale it down first")


def decode_image(path):
    """An image file -> uint8 [H,W] grayscale (step 1 of the recipe); raises InputError.

    Its size is read from the header and refused above MAX_IMAGE_PIXELS before anything is decoded."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise InputError(f"{path}: reading image files needs Pillow ({e}); pip install pillow") from None
    f = open_regular(path)
    try:
        with f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies
            with Image.open(f) as im:
                _check_pixels(im.size, path)
                im.load()
                gray = _to_gray(im, path)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{path}: cannot decode it as an image (expected PNG/JPEG/... , a .npy array "
                         f"or an IDX file)") from None
    except Image.DecompressionBombError as e:  # above Pillow's own limit: its message has the size
        raise InputError(f"{path}: {' '.join(str(e).split())[:200]}; l2fast decodes at most "
                         f"{MAX_IMAGE_PIXELS:,} pixels (l2fast.inputs.MAX_IMAGE_PIXELS)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: cannot decode the image ({' '.join(str(e).split())[:200]}); "
                         f"expected a complete image file (PNG, JPEG, ...)") from None
    if gray.size == 0:
        raise InputError(f"{path}: empty image")
    return gray


def _box(mask):
    """(top, bottom, left, right) of the True pixels of a 2-D mask, bounds inclusive; None when none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (rows[0], rows[-1], cols[0], cols[-1]) if len(rows) else None


def center_of_mass(image):
    """(row, column) of an image's centre of mass, its pixel values the weights; None when all are 0."""
    weights = image.astype(np.float64)
    total = weights.sum()
    if not total > 0:
        return None
    return ((weights.sum(axis=1) * np.arange(weights.shape[0])).sum() / total,
            (weights.sum(axis=0) * np.arange(weights.shape[1])).sum() / total)


def looks_like_mnist(gray):
    """True when a uint8 [28,28] white-on-black digit already sits as MNIST's do: its bounding box
    (pixels above FIT_THRESHOLD) MNIST_BOX px on its longer side, its centre of mass within
    MNIST_CENTER_SLACK px of MNIST_CENTER. An image with no digit counts as fitted: there is nothing to move."""
    box = _box(gray > FIT_THRESHOLD)
    if box is None:
        return True
    top, bottom, left, right = box
    longer = max(bottom - top, right - left) + 1
    cy, cx = center_of_mass(gray)
    return (MNIST_BOX[0] <= longer <= MNIST_BOX[1] and abs(cy - MNIST_CENTER) <= MNIST_CENTER_SLACK
            and abs(cx - MNIST_CENTER) <= MNIST_CENTER_SLACK)


def fit_mnist(gray):
    """uint8 [H,W] white-on-black -> uint8 [28,28]: bounding box into 20x20 (aspect kept), centre of mass
    at MNIST's (14, 14)."""
    from PIL import Image

    box = _box(gray > FIT_THRESHOLD)
    if box is None:
        return np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    top, bottom, left, right = box
    crop = gray[top:bottom + 1, left:right + 1]
    h, w = crop.shape
    scale = FIT_BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.uint8)
    cy, cx = center_of_mass(small) or ((nh - 1) / 2, (nw - 1) / 2)
    top = int(np.clip(round(MNIST_CENTER - cy), 0, IMAGE_SIZE - nh))
    left = int(np.clip(round(MNIST_CENTER - cx), 0, IMAGE_SIZE - nw))
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    canvas[top:top + nh, left:left + nw] = small
    return canvas


def load_image(path, background="auto", fit="auto"):
    """An image file -> uint8 [28,28] white digit on black, by the recipe in the module docstring.

    Warns (FitWarning) when the result looks wrong; raises InputError when it cannot be read.
    """
    if background not in BACKGROUNDS or fit not in FITS:
        raise ValueError(f"background={background!r}, fit={fit!r}: expected one of {BACKGROUNDS} / {FITS}")
    gray = decode_image(path)
    light_border, border = _gray_needs_invert(gray)
    if background == "white" or (background == "auto" and light_border):
        gray = 255 - gray
    elif background == "black" and light_border:
        warnings.warn(f"{path}: its border is light (mean {border:.0f} of 255) but background='black' takes it as "
                      f"the background of a light digit; a dark digit on paper needs --background auto or white",
                      FitWarning, stacklevel=2)
    mask = gray > FIT_THRESHOLD
    if not mask.any():
        warnings.warn(f"{path}: no digit found (no pixel above {FIT_THRESHOLD} after polarity); the prediction "
                      f"is a guess", FitWarning, stacklevel=2)
    elif mask.mean() > 0.5:
        warnings.warn(f"{path}: {mask.mean():.0%} of the image is foreground after polarity (MNIST digits cover "
                      f"about 20%): wrong --background?", FitWarning, stacklevel=2)
    if fit == "auto":
        fit = "none" if gray.shape == (IMAGE_SIZE, IMAGE_SIZE) and looks_like_mnist(gray) else "mnist"
    if fit == "mnist":
        return fit_mnist(gray)
    if fit == "stretch":
        if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
            return gray
        from PIL import Image

        return np.asarray(Image.fromarray(gray).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS),
                          dtype=np.uint8)
    if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"{path}: {gray.shape[1]}x{gray.shape[0]} pixels, expected 28x28 with --fit none")
    return gray


# ------------------------------------------------------------------------------------ arrays

def _images(raw, name, start, background):
    """A chunk read from an array or IDX file, `raw` [n, 28, 28] uint8 or float, -> the model's input,
    float32 [n, 1, 28, 28] in [0, 1], white digit on black (polarity after the range check)."""
    if raw.dtype == np.uint8:
        return to_model_input(apply_background(raw, background))
    where = f"{name} (images {start}..{start + len(raw) - 1})" if start else name
    return apply_background(to_model_input(raw, where), background)


def _npy_batches(f, name, batch_size, background):
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (only 1.0 and 2.0 hold plain arrays)")
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise InputError(f"{name}: not a readable .npy array ({' '.join(str(e).split())[:200]}); "
                         f"expected one array saved with numpy.save") from None
    if dtype.hasobject:
        raise InputError(f"{name}: an array of Python objects, expected {EXPECTED_IMAGES}")
    check_images(shape, dtype, name)
    offset = f.tell()
    count = math.prod(shape) // _PIXELS  # Python ints: a claimed (2**60 + 1, 28, 28) cannot wrap around
    claimed = count * _PIXELS * dtype.itemsize
    actual = os.fstat(f.fileno()).st_size - offset
    if actual != claimed:  # before allocating anything: a 200-byte file may claim 784 GB
        raise InputError(f"{name}: its header claims shape {list(shape)} {dtype} ({claimed:,} bytes) but the file "
                         f"holds {actual:,} bytes after the header: truncated or corrupted; expected one array "
                         f"saved with numpy.save")
    if fortran and count:
        # An image is not contiguous in a Fortran-order file (one [28,28] image is stored transposed):
        # map the file and copy chunk by chunk into C order.
        mm = np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape, order="F")
        images = mm[None] if len(shape) == 2 else mm[:, 0] if len(shape) == 4 else mm
        for start in range(0, count, batch_size):
            yield Batch(_images(np.ascontiguousarray(images[start:start + batch_size]), name, start, background), start)
        return
    for start in range(0, count, batch_size):
        n = min(batch_size, count - start)
        raw = np.fromfile(f, dtype=dtype, count=n * _PIXELS)
        if raw.size != n * _PIXELS:
            raise InputError(f"{name}: ended at image {start + raw.size // _PIXELS} of {count}: truncated while read")
        yield Batch(_images(raw.reshape(n, IMAGE_SIZE, IMAGE_SIZE), name, start, background), start)


def _idx_batches(f, name, batch_size, background):
    """The images of an IDX file (gzipped or not) read through l2fast.idx.IDXReader, its errors InputErrors."""
    compressed = f.read(2) == _GZIP_MAGIC
    f.seek(0)
    try:
        with IDXReader(f, name=name, compressed=compressed, item_shape=(IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8,
                       expected="an IDX image file, uint8 [N,28,28]") as reader:
            for start in range(0, reader.shape[0], batch_size):
                yield Batch(_images(reader.read(batch_size), name, start, background), start)
            reader.check_end()
    except IDXError as e:
        raise InputError(str(e)) from None


def iter_batches(path, background="auto", fit="auto", batch_size=DEFAULT_BATCH):
    """Yield Batch(images, start) chunks of at most batch_size images from one input file.

    Raises InputError naming the file: before the first chunk for anything its header or size
    shows, or after the chunks read so far for damage found while streaming.
    """
    if background not in BACKGROUNDS or fit not in FITS:
        raise ValueError(f"background={background!r}, fit={fit!r}: expected one of {BACKGROUNDS} / {FITS}")
    path = Path(path)
    name = str(path)
    with open_regular(path) as f:
        head = f.read(8)
        f.seek(0)
        if head.startswith(_ZIP_MAGIC) and path.suffix.lower() in (".npy", ".npz"):
            raise InputError(f"{name}: holds several arrays (.npz), expected one .npy array")
        if head.startswith(_NPY_MAGIC) or path.suffix.lower() == ".npy":
            yield from _npy_batches(f, name, batch_size, background)
            return
        if head.startswith(_GZIP_MAGIC) or (len(head) >= 4 and head[:2] == b"\0\0"):
            try:
                yield from _idx_batches(f, name, batch_size, background)
            except OSError as e:
                raise InputError(f"{name}: cannot read it ({e.strerror or e})") from None
            return
    yield Batch(to_model_input(load_image(path, background, fit)), None)
