"""The one place where CLIs turn library exceptions into a one-line message and an exit code."""
import argparse
import contextlib
import signal
import sys
import threading

from .errors import L2fastError, UsageError, describe


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageError, so that run() prints them as one line with exit 2
    (argparse itself prints the usage block and the error on two or more lines)."""

    def error(self, message):
        raise UsageError(message)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread (see sigterm_raises) so that every cleanup runs as for Ctrl-C."""


@contextlib.contextmanager
def sigterm_raises(exception=Terminated):
    """Within the block, SIGTERM raises `exception` in the main thread instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise exception()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error(message, file=None):
    """Print `error: <message>` on one line (newlines and runs of spaces folded) to stderr."""
    print("error: " + " ".join(str(message).split()), file=file or sys.stderr, flush=True)


def run(main, argv=None):
    """Call main(argv) and return its exit code.

    An L2fastError becomes `error: ...` and its exit_code (2 for usage and data errors, 1 for
    failures); an OSError on a user-given path becomes `error: ...` and exit 2; Ctrl-C exits
    130, SIGTERM inside sigterm_raises() 143; a reader that left a pipe (`... | head`) exits 1
    quietly. Anything else is a bug and keeps its traceback.
    """
    try:
        return main(argv)
    except L2fastError as e:
        error(e)
        return e.exit_code
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return _broken_pipe()
        error(describe(e))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


def _broken_pipe():
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass
    return 1
