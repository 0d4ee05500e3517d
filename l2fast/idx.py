"""Read and write IDX files (the MNIST format), optionally gzipped. numpy only: no torch here.

Layout: 2 zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per
dimension, then the values, big-endian, row-major.
"""
import gzip
import os
from pathlib import Path

import numpy as np

from ._io import atomic_write_bytes

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}


class IDXError(ValueError):
    """A file that is not a well-formed IDX file; the message names the file."""


def read_idx(path):
    """The array stored in an IDX file (`.gz` is decompressed); raises IDXError when malformed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise IDXError(f"{path}: file not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise IDXError(f"{path}: cannot read it as {'gzip' if path.suffix == '.gz' else 'a file'} ({e})") from None
    return parse_idx(raw, str(path))


def parse_idx(raw, name="<bytes>"):
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise IDXError(f"{name}: not an IDX file (expected magic bytes 00 00 <dtype code> <ndim>, "
                       f"got {raw[:4].hex(' ') or 'an empty file'})")
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise IDXError(f"{name}: IDX header truncated or without dimensions")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise IDXError(f"{name}: header says shape {shape} ({expected} bytes) but the file holds "
                       f"{len(raw)} bytes: truncated or corrupted")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path, array, compress=None):
    """Write a uint8/int8 array as IDX, gzipped when the name ends in `.gz`; atomic."""
    array = np.ascontiguousarray(array)
    if array.dtype not in _CODES:
        raise ValueError(f"write_idx: only uint8/int8 arrays are written, got {array.dtype}")
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.tobytes()
    if compress if compress is not None else str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=9, mtime=0)
    atomic_write_bytes(os.fspath(path), data)
