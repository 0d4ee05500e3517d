"""Nothing is half-written and nothing a user has is replaced: files and folders appear under their
final name only when complete, and only regular files are ever renamed over.

A target that is a symlink is resolved and its target written. A target that exists and is not a
regular file is never replaced: a character device (/dev/null, a terminal) or a FIFO is written to
directly, as a stream; a folder, a block device or a socket is refused with OutputError.
"""
import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import OutputError


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_target(path):
    """(real path, stream): `path` with symlinks resolved; stream is True when the target exists and
    must be written in place (a character device or a FIFO). OutputError for what can't be written."""
    real = Path(os.path.realpath(path))
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return real, False
    except NotADirectoryError:
        raise OutputError(f"{path}: a parent of it is a file, not a folder") from None
    if stat.S_ISREG(mode):
        return real, False
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return real, True
    kind = "a folder" if stat.S_ISDIR(mode) else "a block device" if stat.S_ISBLK(mode) else \
        "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
    shown = str(path) if real == Path(path).absolute() else f"{path} (-> {real})"
    raise OutputError(f"{shown}: is {kind}; expected a file name (or a character device or FIFO "
                      f"to stream to), and it is never replaced")


def open_stream(path):
    """A binary file object writing into an existing character device or FIFO (see resolve_target);
    a FIFO without a reader is refused, not waited on."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise OutputError(f"{path}: a FIFO with no reader; start the reader first") from None
        raise
    os.set_blocking(fd, True)
    return os.fdopen(fd, "wb")


def _write_stream(path, data):
    with open_stream(path) as f:
        f.write(data)


def atomic_write_bytes(path, data):
    """Write `data` to `path`: a regular file is replaced atomically (temp file + rename), a
    symlink's target is written, a device or FIFO is streamed to, anything else refused."""
    real, stream = resolve_target(path)
    if stream:
        _write_stream(real, data)
        return
    with atomic_path(real) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file path beside `path` for a library that wants a filename (torch.save,
    matplotlib); on success it becomes `path` by the rules of atomic_write_bytes, else it is removed."""
    real, stream = resolve_target(path)
    real.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=None if stream else real.parent, prefix=f".{real.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if stream:
            _write_stream(real, tmp.read_bytes())
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
            resolve_target(real)  # re-checked just before the rename: still a regular file or absent
            os.replace(tmp, real)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def create_run_folder(path, overwrite=False):
    """Make `path` the run's own folder: created exclusively, or an existing empty folder, or (with
    overwrite) an existing one. OutputError when it is a file, under a file, or a non-empty folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True)
        return path
    except FileExistsError:
        pass
    except NotADirectoryError:
        raise OutputError(f"{path}: a parent of it is a file, not a folder") from None
    if not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder (expected a new or empty run folder)")
    if not overwrite and any(path.iterdir()):
        raise OutputError(f"{path}: a non-empty folder (expected a new or empty run folder); "
                          f"choose another --out, or pass --overwrite to write over it")
    return path


def create_unique_folder(parent, stem):
    """parent/stem, or parent/stem-2, -3, ...: the first that this call itself creates (mkdir is the
    arbiter, so concurrent callers always get distinct folders)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
