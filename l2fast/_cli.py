"""What every l2fast command shares: the one place where library exceptions become a one-line
message and an exit code (`run`), argparse as the commands use it (their name as the user typed it,
defaults shown, errors as UsageError), and modules imported on first use, so that `--help` answers
without importing torch."""
import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

from .errors import L2fastError, UsageError, describe


def prog(module, script):
    """The command as the user typed it: the console script `script` (l2fast-train) or `python -m module`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script if name in (script, script + ".exe") else f"python -m {module}"


class HelpFormatter(argparse.HelpFormatter):
    """A description of several lines (a module docstring) as written, one line wrapped; and every
    option's default shown: appended as `(default: X)` unless its help already says it or there is
    nothing to show (a flag, no default)."""

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == "" or
                default is argparse.SUPPRESS or not action.option_strings or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageError, so that run() prints them as one line with exit 2
    (argparse itself prints the usage block and the error on two or more lines), and whose help
    shows every default (HelpFormatter)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        raise UsageError(message)


class LazyModule:
    """A module imported on its first attribute access. A command binds the modules that import torch
    this way, so that parsing its options (and `--help`) costs no torch import."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):  # only for what the instance itself lacks, i.e. the module's names
        module = self.__dict__.get("_module")
        if module is None:
            module = self.__dict__["_module"] = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self):
        return f"<module {self._name!r}, imported on first use>"


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
