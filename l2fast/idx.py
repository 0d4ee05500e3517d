"""Read and write IDX files (the MNIST format), optionally gzipped. numpy only: no torch here.

Layout: 2 zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per
dimension, then the values, big-endian, row-major.

Reading is bounded: the header's dtype and item shape are checked against what the caller expects,
its claimed size against the file's real size (or, for gzip, against the most deflate can inflate
that many bytes to and the size the gzip trailer records) and the caller's item limit, all before
anything is allocated; a gzip file is inflated piece by piece into an array of exactly the claimed
size, so a gzip bomb costs no more memory than its header admits.
"""
import gzip
import io
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ._io import atomic_write_bytes
from .errors import DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
DEFLATE_MAX_RATIO = 1032  # deflate's limit: one compressed byte never inflates to more than ~1032
_CHUNK = 1 << 22
MAX_NDIM = 32  # numpy's arrays have at most 64 dimensions; no IDX file in use has more than 4


class IDXError(DataError):
    """A file that is not a well-formed IDX file; the message names the file."""


class IDXReader:
    """An IDX file opened for reading in pieces: `shape`, `dtype`, then `read(count)` for the next
    items along the first axis. `max_items` bounds the first dimension the header may claim.

    `source` is a path (a `.gz` name is inflated) or a seekable binary file object (then give `name`,
    and `compressed` for gzip). `item_shape` and `dtype`, when given, are what each item must be: a
    header that says otherwise is refused before any data is read. Every error ends with `expected`,
    the caller's words for what the file should be.
    """

    def __init__(self, source, max_items=None, name=None, compressed=None, item_shape=None, dtype=None,
                 expected=None):
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            self.name = name or str(path)
            compressed = path.suffix == ".gz" if compressed is None else compressed
            try:
                self._raw = open(path, "rb")
            except FileNotFoundError:
                raise IDXError(f"{self.name}: file not found") from None
            except OSError as e:
                raise IDXError(f"{self.name}: cannot read it ({e.strerror or e})") from None
        else:
            self.name, self._raw = name or "<bytes>", source
        self.compressed = bool(compressed)
        self.expected = expected or "an IDX file"
        self.file_size = self._raw.seek(0, io.SEEK_END)
        self._raw.seek(max(0, self.file_size - 4))
        self._isize = int.from_bytes(self._raw.read(4), "little")  # gzip's trailer: inflated size mod 2**32
        self._raw.seek(0)
        self._f = gzip.GzipFile(fileobj=self._raw, mode="rb") if self.compressed else self._raw
        try:
            self._read_header(max_items, item_shape, dtype)
        except BaseException:
            self.close()
            raise

    def _read_header(self, max_items, item_shape, dtype):
        head = self._read(4)
        if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES:
            raise IDXError(f"{self.name}: not an IDX file (magic bytes 00 00 <dtype code> <ndim> expected, "
                           f"got {head.hex(' ') or 'an empty file'}); expected {self.expected}")
        self.dtype, ndim = np.dtype(_DTYPES[head[2]]), head[3]
        dims = self._read(4 * ndim)
        if ndim == 0 or len(dims) < 4 * ndim:
            raise IDXError(f"{self.name}: IDX header truncated or without dimensions; expected {self.expected}")
        self.header_bytes = 4 + 4 * ndim
        self.shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
        # Every claim of the header is checked before anything is allocated: the layout first, then
        # the sizes (Python ints: no product overflows), then the size against the file's.
        layout = f"{self.dtype.name} {list(self.shape) if ndim <= 8 else f'with {ndim} dimensions'}"
        wrong_shape = item_shape is not None and self.shape[1:] != tuple(item_shape)
        if wrong_shape or (dtype is not None and self.dtype != np.dtype(dtype)):
            raise IDXError(f"{self.name}: header says {layout}; expected {self.expected}")
        if ndim > MAX_NDIM:
            raise IDXError(f"{self.name}: header says {layout}; expected at most {MAX_NDIM} dimensions")
        self.item_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self.nbytes = self.shape[0] * self.item_bytes
        total = self.header_bytes + self.nbytes
        if max_items is not None and self.shape[0] > max_items:
            raise IDXError(f"{self.name}: header claims {self.shape[0]:,} items (shape {self.shape}), more than "
                           f"the {max_items:,} expected here")
        if self.compressed and total > self.file_size * DEFLATE_MAX_RATIO:
            raise IDXError(f"{self.name}: header claims shape {self.shape} ({total:,} bytes), more than a "
                           f"{self.file_size:,}-byte gzip file can inflate to: corrupted; expected {self.expected}")
        if self.compressed and total % 2 ** 32 != self._isize:
            raise IDXError(f"{self.name}: header says shape {self.shape} ({total:,} bytes) but the gzip trailer "
                           f"says {self._isize:,} bytes (mod 2**32): truncated, corrupted, or more data than its "
                           f"header says; expected {self.expected}")
        if not self.compressed and total != self.file_size:
            raise IDXError(f"{self.name}: header says shape {self.shape} ({total:,} bytes) but the file holds "
                           f"{self.file_size:,} bytes: truncated or corrupted; expected {self.expected}")
        self._left = self.shape[0]

    def _read(self, n):
        try:
            return self._f.read(n)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise IDXError(f"{self.name}: cannot read it as {'gzip' if self.compressed else 'a file'} "
                           f"({' '.join(str(e).split())[:200]}); expected {self.expected}") from None

    def read(self, count=None):
        """The next `count` items (all that are left when None) as a native-byte-order array."""
        n = self._left if count is None else min(int(count), self._left)
        buf = np.empty(n * self.item_bytes, dtype=np.uint8)
        view, done = memoryview(buf), 0
        while done < len(buf):
            try:
                got = self._f.readinto(view[done:done + _CHUNK])
            except (OSError, EOFError, zlib.error) as e:
                raise IDXError(f"{self.name}: cannot read it as {'gzip' if self.compressed else 'a file'} "
                               f"({' '.join(str(e).split())[:200]}); expected {self.expected}") from None
            if not got:
                raise IDXError(f"{self.name}: header says shape {self.shape} but the data ends early: "
                               f"truncated or corrupted; expected {self.expected}")
            done += got
        self._left -= n
        array = buf.view(self.dtype).reshape(n, *self.shape[1:])
        return array if self.dtype.byteorder in "=|" else array.astype(self.dtype.newbyteorder("="))

    def check_end(self):
        """IDXError when bytes follow the data the header describes."""
        if self._read(1):
            raise IDXError(f"{self.name}: holds more data than its header's shape {self.shape}: corrupted; "
                           f"expected {self.expected}")

    def close(self):
        if self._f is not self._raw:
            self._f.close()
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_idx(path, max_items=None, item_shape=None, dtype=None, expected=None):
    """The array stored in an IDX file (`.gz` is inflated); IDXError when malformed, when the header
    claims more than `max_items` items or more bytes than the file can hold, or (when given) items
    of another shape than `item_shape` or another dtype than `dtype` (`expected` says what was wanted)."""
    with IDXReader(path, max_items=max_items, item_shape=item_shape, dtype=dtype, expected=expected) as reader:
        array = reader.read()
        reader.check_end()
    return array


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
