"""Shared CLI plumbing: user mistakes exit with code 2 and a one-line message, no traceback."""
import sys


class CLIError(Exception):
    """A usage or data error: the message says what was wrong, where, and what was expected."""


def run(main, argv=None, user_errors=()):
    """Call main(argv); CLIError and the given exception types become `error: ...` and exit 2."""
    try:
        return main(argv)
    except (CLIError, *user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
