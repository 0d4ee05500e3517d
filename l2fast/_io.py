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
import signal
import stat
import tempfile
import threading
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
    symlink's target is written, a device or FIFO is streamed to, anything else refused.
    OutputError naming `path` when it cannot be written."""
    real, stream = resolve_target(path)
    if stream:
        try:
            _write_stream(real, data)
        except OSError as e:
            raise write_error(path, e) from None
        return
    with atomic_path(real) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file path beside `path` for a library that wants a filename (torch.save,
    matplotlib); on success it becomes `path` by the rules of atomic_write_bytes, else it is removed.
    An OSError on the way (a full disk, a stream whose reader left) is an OutputError naming `path`."""
    real, stream = resolve_target(path)
    tmp = None
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=None if stream else real.parent, prefix=f".{real.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        yield tmp
        if stream:
            _write_stream(real, tmp.read_bytes())
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
            resolve_target(real)  # re-checked just before the rename: still a regular file or absent
            os.replace(tmp, real)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def write_error(path, e):
    """The OutputError for an OSError met while writing `path`: the path and the reason, one line."""
    why = "its reader went away, broken pipe" if isinstance(e, BrokenPipeError) else e.strerror or str(e)
    return OutputError(f"{path}: cannot write it ({why})")


def rewrite_in_place(path, data):
    """Overwrite the existing regular file `path` with `data` through its own blocks, without a
    temporary file: the last resort for a small record on a full disk, where a new file gets no
    space but the file's own blocks are still there. Not atomic; OutputError when it fails."""
    try:
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e) from None


def nearest_existing(path):
    """`path` itself, or its nearest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_creatable(path, what, folder=False):
    """OutputError (worded with `what`, e.g. "--out run") unless `path` can be written: an existing
    folder (folder=True) must be writable; anything else is created in its nearest existing
    ancestor, which must be a writable folder."""
    path = Path(os.path.abspath(path))
    if folder and path.is_dir():
        where = path
    else:
        where = nearest_existing(path.parent)
        if folder and os.path.lexists(path):
            raise OutputError(f"{what}: exists and is not a folder")
        if not where.is_dir():
            raise OutputError(f"{what}: a parent of it is a file, not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        why = "not writable" if where == path else f"cannot be created, {where} is not writable"
        raise OutputError(f"{what}: {why} (read-only)")


def free_bytes(path):
    """Bytes free to this user on the filesystem that holds `path` (or would hold it)."""
    st = os.statvfs(nearest_existing(path))
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block is done (delivered right after it): for the few writes
    that must not be cut in half. Main thread only (elsewhere signals do not reach Python)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
