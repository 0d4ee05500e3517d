"""Publishing an export into its output folder without losing anything the user has.

Export writes into a staging folder; only when every check passed are its files moved into the
output folder, one `os.replace` per file. Rules:
  * Only the files export writes (OWNED) are replaced; README.md (KEPT) and nothing else is kept
    untouched; any other entry, or an owned name that is not a regular file (a folder called
    model.onnx, a symlink), is refused with OutputError (exit 2) before the export starts and
    again just before the files move, so a file written into the folder during the export stops it.
  * An output path that is a symlink is followed: the files land in the folder it points to.
  * A new output folder appears whole (the staging folder is renamed to it); an existing one gets
    its owned files replaced with SIGINT/SIGTERM held off, and put back if a move fails.
  * The staging folder (and any parent folder created for it) is removed on every failure,
    Ctrl-C included; the caller turns SIGTERM into an exception so the same cleanup runs.
"""
import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ._io import _umask, nearest_existing, signals_held
from .contract import ARTIFACTS, MANIFEST_FILE
from .errors import OutputError

OWNED = (*ARTIFACTS, MANIFEST_FILE)  # the manifest moves last: it vouches for the artifacts
KEPT = ("README.md",)
_STAGING_PREFIX = ".l2fast-export-"


def _describe(path):
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "gone"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def _unexpected(folder, ignore=()):
    """Entries of `folder` export may not touch: '<name> (<what>)' for each."""
    bad = []
    for name in sorted(os.listdir(folder)):
        if name in KEPT or name in ignore:
            continue
        what = _describe(folder / name)
        if name in OWNED and what in ("a regular file", "gone"):
            continue
        bad.append(f"{name} ({what})" if name in OWNED else name)
    return bad


def _refuse(given, bad, when=""):
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return OutputError(f"output folder {given}: {when}holds {shown}; export replaces only its own regular files "
                       f"({', '.join(OWNED)}) and keeps README.md: move the others away or choose a new or "
                       f"empty folder")


def check_out(out):
    """The folder `out` names (symlinks followed), checked for publishing; raises OutputError."""
    given = Path(out)
    target = Path(os.path.realpath(given))
    if os.path.lexists(target) and not target.is_dir():
        raise OutputError(f"output folder {given}: exists and is {_describe(target)}, not a folder")
    if target.is_dir():
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputError(f"output folder {given}: not writable (read-only); choose another --out")
        bad = _unexpected(target)
        if bad:
            raise _refuse(given, bad)
    else:
        parent = nearest_existing(target.parent)
        if not parent.is_dir():
            raise OutputError(f"output folder {given}: {parent} is {_describe(parent)}, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"output folder {given}: cannot be created, {parent} is not writable (read-only)")
    return target


def _mkdirs(folder):
    """Create `folder` and missing parents; the ones created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir()
    return list(reversed(missing))


@contextlib.contextmanager
def staged(out):
    """Yield an empty staging folder; when the block succeeds, publish its files into `out`.

    The files written into it must be OWNED names. On any failure (or Ctrl-C) the staging folder
    goes and `out` is as it was. Raises OutputError when `out` cannot be published into.
    """
    given = Path(out)
    target = check_out(given)
    inside = target.is_dir()  # stage inside an existing folder: same filesystem as the files it replaces
    created = [] if inside else _mkdirs(target.parent)
    try:
        staging = Path(tempfile.mkdtemp(dir=target if inside else target.parent,
                                        prefix=_STAGING_PREFIX if inside else f".{target.name}{_STAGING_PREFIX}",
                                        suffix=".tmp"))
    except OSError as e:
        _remove_empty(created)
        raise OutputError(f"output folder {given}: cannot write in {target if inside else target.parent} "
                          f"({e.strerror or e})") from None
    try:
        yield staging
        _publish(staging, target, given)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.exists():
            _remove_empty(created)


def _remove_empty(folders):
    for f in reversed(folders):
        with contextlib.suppress(OSError):
            f.rmdir()


def _publish(staging, target, given):
    names = sorted(os.listdir(staging), key=lambda n: (n == MANIFEST_FILE, n))
    stray = [n for n in names if n not in OWNED]
    if stray:
        raise OutputError(f"internal: export wrote {stray} besides its own files; nothing was published to {given}")
    with signals_held():
        if not os.path.lexists(target):
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the published folder gets the usual mode
            try:
                os.rename(staging, target)  # a new folder appears whole
                return
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
            # something appeared at `target` during the export: checked like any existing folder
        if not target.is_dir():
            raise OutputError(f"output folder {given}: became {_describe(target)} during the export; "
                              "nothing was published")
        bad = _unexpected(target, ignore={staging.name})
        if bad:
            raise _refuse(given, bad, when="changed during the export: it now ")
        _replace_files(staging, target, names)


def _replace_files(staging, target, names):
    """Move each file over its namesake; if one move fails, put back the ones already moved."""
    done = []  # (name, backup path or None when there was no file before)
    try:
        for name in names:
            dst = target / name
            backup = None
            if os.path.lexists(dst):
                backup = staging / f".previous-{name}"
                try:
                    os.link(dst, backup)
                except OSError:
                    shutil.copy2(dst, backup)
            os.replace(staging / name, dst)
            done.append((name, backup))
    except BaseException:
        for name, backup in reversed(done):
            with contextlib.suppress(OSError):
                if backup is None:
                    os.unlink(target / name)
                else:
                    os.replace(backup, target / name)
        raise
