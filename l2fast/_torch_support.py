"""The torch releases l2fast supports: setup.py refuses to build against an older one, l2fast._extension
to load on one. No imports beyond the standard library: setup.py loads this file by path."""
import re

MIN_TORCH = (2, 11)  # pyproject.toml's torch>= says the same (tests/test_torch_support.py checks it)
TESTED = "2.11.0, 2.14.1 and 2.15.0"  # each built with its CUDA kernels and op-tested in CI (.ci/run)


def parse(version):
    """(major, minor) of a torch version string such as '2.15.0+cu132' or '2.16.0.dev20270101'."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if not match:
        raise ValueError(f"not a torch version: {version!r}")
    return int(match[1]), int(match[2])


def problem(version):
    """Why l2fast cannot work with this torch (one line), or None when it is supported."""
    if parse(version) >= MIN_TORCH:
        return None
    low = ".".join(map(str, MIN_TORCH))
    return f"l2fast needs torch >= {low} (tested: {TESTED}); torch {version} is installed: pip install 'torch>={low}'"
