"""The library's exceptions: one class per kind of failure, each carrying the CLI exit code it maps to.

Library code raises these; only the CLIs (through `l2fast._cli.run`) turn them into one-line
`error: ...` messages and exit codes. Torch-free, so that `l2fast.infer` can use it.
"""


class L2fastError(Exception):
    """Base class. `exit_code` is what a CLI exits with when this error ends it."""

    exit_code = 1


class UsageError(L2fastError, ValueError):
    """A bad option or argument: what was wrong and what was expected (exit 2)."""

    exit_code = 2


class DataError(L2fastError, ValueError):
    """A dataset file is missing, malformed or implausible (exit 2)."""

    exit_code = 2


class CheckpointError(L2fastError, ValueError):
    """A checkpoint is missing, unreadable, not an l2fast checkpoint, or inconsistent (exit 2)."""

    exit_code = 2


class ModelError(L2fastError, ValueError):
    """An exported model is missing, not a valid ONNX model, or does not match its manifest (exit 2)."""

    exit_code = 2


class InputError(L2fastError, ValueError):
    """An inference input cannot be read or is not an image batch (the CLI goes on with the others)."""

    exit_code = 2


class OutputError(L2fastError, ValueError):
    """An output path cannot be used without losing or replacing something the user has (exit 2)."""

    exit_code = 2


class ExportError(L2fastError):
    """An exporter could not produce a valid artifact (exit 1)."""


class VerificationError(L2fastError):
    """The artifacts disagree with eager PyTorch beyond tolerance (exit 1); nothing is published."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


class DivergedError(L2fastError):
    """Training produced a non-finite loss (exit 1); the message names the step."""


def describe(e):
    """An exception as one message: an OSError on a path as `path: reason`, anything else its text."""
    if isinstance(e, OSError) and not isinstance(e, L2fastError):
        return f"{e.filename}: {e.strerror or e}" if e.filename else str(e.strerror or e)
    return str(e)
