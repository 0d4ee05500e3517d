"""A training run's folder: created for the run alone, then model.pt, metrics.jsonl (strict JSON
Lines), summary.json (how the run ended) and loss.png, each written atomically."""
import datetime
import json
import math
from pathlib import Path

from ._io import atomic_path, atomic_write_text, create_run_folder, create_unique_folder, open_stream, resolve_target
from .errors import OutputError

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
    each record once, as a stream held open for the run."""

    def __init__(self, path):
        real, stream = resolve_target(path)
        self.path, self.stream, self.written = Path(path), open_stream(real) if stream else None, 0

    def write(self, records):
        if self.stream is None:
            atomic_write_text(self.path, "".join(dumps(r) + "\n" for r in records))
        else:
            self.stream.write("".join(dumps(r) + "\n" for r in records[self.written:]).encode())
            self.stream.flush()
        self.written = len(records)

    def close(self):
        if self.stream is not None:
            self.stream.close()


def write_summary(out, summary):
    atomic_write_text(Path(out) / "summary.json", dumps(summary, indent=2) + "\n")


def plot_losses(path, history):
    """Data loss and L2 loss per global step, log y scale."""
    from matplotlib.figure import Figure

    steps = range(1, len(history) + 1)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for column, label in ((1, "data loss (cross entropy)"), (2, "L2 loss (weight * sum p^2)")):
        values = [row[column] if row[column] > 0 else float("nan") for row in history]
        ax.plot(steps, values, label=label, linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def prepare_outputs(out, metrics, overwrite):
    """(run folder, metrics path): the metrics path checked, then the folder created for this run
    (exclusively, or an empty one, or any with overwrite); OutputError before any training otherwise.
    `out` None: a new runs/<timestamp> folder; `metrics` None: the run folder's metrics.jsonl."""
    if metrics is not None:
        try:
            real, stream = resolve_target(metrics)  # OutputError for a folder, socket, block device
        except OutputError as e:
            raise OutputError(f"--metrics {e}") from None
        if not stream and real.is_file() and real.stat().st_size and not overwrite:
            raise OutputError(f"--metrics {metrics}: an existing file; choose another name, or pass "
                              f"--overwrite to replace it")
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
