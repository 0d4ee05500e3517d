"""A training run's folder: created for the run alone, then model.pt, metrics.jsonl (strict JSON
Lines), summary.json (how the run ended, whatever ended it) and loss.png, each written atomically.
Every check that can be made is made before the folder is created."""
import contextlib
import datetime
import json
import math
import os
import re
import sys
from pathlib import Path

from ._io import (atomic_write_bytes, atomic_write_text, check_creatable, create_run_folder,
                  create_unique_folder, free_bytes, open_stream, resolve_target, rewrite_in_place, signals_held,
                  write_error)
from .errors import DivergedError, L2fastError, OutputError, describe
from .lossplot import plot_losses  # noqa: F401  (loss.png, the run folder's plot)

RUN_FILES = ("model.pt", "metrics.jsonl", "summary.json", "loss.png")


def strict_json(value):
    """`value` with every non-finite float replaced by None, so that json.dumps writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps(value, **kwargs):
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


class MetricsWriter:
    """metrics.jsonl, rewritten atomically with every record so far; a device or FIFO target gets
    each record once, as a stream held open for the run. A write that fails (a full disk, a FIFO
    whose reader left) raises OutputError naming the path."""

    def __init__(self, path):
        real, stream = resolve_target(path)
        self.path, self.stream, self.written = Path(path), open_stream(real) if stream else None, 0

    def write(self, records):
        try:
            if self.stream is None:
                atomic_write_text(self.path, "".join(dumps(r) + "\n" for r in records))
            else:
                self.stream.write("".join(dumps(r) + "\n" for r in records[self.written:]).encode())
                self.stream.flush()
        except OSError as e:
            raise write_error(self.path, e) from None
        self.written = len(records)

    def close(self):
        if self.stream is not None:
            with contextlib.suppress(OSError):  # what a failed write left in the buffer cannot go anywhere
                self.stream.close()


def write_summary(out, summary):
    """summary.json, atomically; on a disk too full for a new file, over the old one in place."""
    path, data = Path(out) / "summary.json", (dumps(summary, indent=2) + "\n").encode()
    try:
        atomic_write_bytes(path, data)
    except OutputError:
        if not path.is_file():
            raise
        rewrite_in_place(path, data)


@contextlib.contextmanager
def recorded(run, total_steps):
    """Whatever ends the run before its summary says "completed" (run.finished) or "diverged" (written
    where it is found) leaves summary.json saying how, whenever this process can still write:
    run.end(failure, total_steps) with failure None for an interruption (Ctrl-C, SIGTERM), else the
    exception the run failed of (an output that could not be written, a torchrun rank that died, a
    bug). A failed collective is re-raised as one line."""
    try:
        yield
    except DivergedError:
        raise
    except BaseException as e:
        if run.finished:
            raise
        failure = _failure_of(e)
        for attempt in (1, 2):
            try:
                with signals_held():  # the record is not cut in half by the next signal
                    run.end(failure, total_steps)
                break
            except KeyboardInterrupt:  # a SIGTERM already pending when `e` came (torchrun stopping the
                if attempt == 2:       # ranks after one died) fires once, in the first try
                    raise
        if _collective_failed(failure):
            raise L2fastError(failure_reason(failure)) from None
        raise


def _failure_of(e):
    """The exception a run failed of, or None for a plain interruption. A signal that came while a
    failed collective was being handled (torchrun stops the other ranks once one died) is that failure."""
    if isinstance(e, Exception):
        return e
    seen = e.__context__
    while seen is not None:
        if _collective_failed(seen):
            return seen
        seen = seen.__context__
    return None


def _collective_failed(e):
    """A collective that failed: torch's DistError, or gloo's transport error (a plain RuntimeError
    from inside DDP's backward when the other end of a connection is gone)."""
    dist_error = getattr(sys.modules.get("torch.distributed"), "DistError", ())
    return isinstance(e, dist_error) or (isinstance(e, RuntimeError) and "/gloo/transport/" in str(e))


def failure_reason(e):
    """A failure as one line: l2fast's own errors and OSErrors as the CLI prints them."""
    if _collective_failed(e):
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first.strip()).split(". ")[0]  # no C++ location
        return f"a collective with the other ranks failed, one of them probably died: {' '.join(first.split())[:300]}"
    if isinstance(e, (L2fastError, OSError)):
        return " ".join(describe(e).split())
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def prepare_outputs(out, metrics, overwrite, need_bytes=0):
    """(run folder, metrics path): every check first, then the folder created for this run
    (exclusively, or an empty one, or any with overwrite), so a refusal leaves nothing behind.
    OutputError before any training when the metrics path is unusable or one of the run's own files,
    a run file's name in --out is taken by something that is not a regular file, or the disk holding
    --out has fewer than `need_bytes` free. `out` None: a new runs/<timestamp> folder; `metrics`
    None: the run folder's metrics.jsonl."""
    if metrics is not None:
        try:
            real, stream = resolve_target(metrics)  # OutputError for a folder, socket, block device
            if not stream:
                check_creatable(real, str(metrics))
        except OutputError as e:
            raise OutputError(f"--metrics {e}") from None
        if not stream and real.is_file() and real.stat().st_size and not overwrite:
            raise OutputError(f"--metrics {metrics}: an existing file; choose another name, or pass "
                              f"--overwrite to replace it")
        if out is not None:
            _check_apart(Path(out), Path(metrics))
    target = Path(out) if out is not None else Path("runs")
    try:
        check_creatable(target, str(target), folder=True)
        if out is not None and overwrite and target.is_dir():
            for name in RUN_FILES:  # refused before anything is removed or trained, not after the run
                resolve_target(target / name)
        free = free_bytes(target)
    except OutputError as e:
        raise OutputError(f"--out {e}") from None
    if free < need_bytes:
        raise OutputError(f"--out {target}: {free:,} bytes free there, the run's files need about {need_bytes:,}; "
                          f"free some space or choose another --out")
    if out is None:
        out = create_unique_folder("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    else:
        try:
            out = create_run_folder(out, overwrite=overwrite)
        except OutputError as e:
            raise OutputError(f"--out {e}") from None
        for name in RUN_FILES:  # with --overwrite: no file of an older run is left beside this one's
            old = out / name
            if overwrite and old.is_file() and not old.is_symlink():
                old.unlink()
    return out, Path(metrics) if metrics is not None else out / "metrics.jsonl"


def _check_apart(out, metrics):
    """OutputError when --metrics is the run folder itself or one of the run's other files in it."""
    real_out, real_metrics = Path(os.path.realpath(out)), Path(os.path.realpath(metrics))
    if real_metrics == real_out:
        raise OutputError(f"--metrics {metrics}: is the --out folder; give a file name (by default the run "
                          f"writes {out / 'metrics.jsonl'})")
    if real_metrics.parent == real_out and real_metrics.name in RUN_FILES and real_metrics.name != "metrics.jsonl":
        raise OutputError(f"--metrics {metrics}: the run writes its own {real_metrics.name} there; choose another "
                          f"name")
