"""Shared by the test modules: the one way to run a Python subprocess, and the torch blocker."""
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import l2fast

# Subprocesses import the same l2fast as the tests: the source tree, or the installed package
# (CI installs it, compiled extension included, and runs pytest from tests/).
PKG_ROOT = Path(l2fast.__file__).resolve().parents[1]

# Put first on PYTHONPATH as sitecustomize.py: makes `import torch` (and anything under it) raise ImportError.
TORCH_BLOCKER = textwrap.dedent("""
    import sys

    class _BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, _BlockTorch())
""")

_BLOCKER_DIR = None


def _blocker_dir():
    global _BLOCKER_DIR
    if _BLOCKER_DIR is None:
        _BLOCKER_DIR = Path(tempfile.mkdtemp(prefix="l2fast-block-torch-"))
        (_BLOCKER_DIR / "sitecustomize.py").write_text(TORCH_BLOCKER)
    return _BLOCKER_DIR


def run_python(args, cwd=None, *, block_torch=False, pythonpath=(PKG_ROOT,), env=None, timeout=240,
               check=False, input=None):
    """`python ARGS` in cwd: a CompletedProcess with text stdout/stderr.

    pythonpath: what PYTHONPATH holds (the caller's PYTHONPATH is dropped; () for none).
    block_torch: `import torch` fails in the child (a sitecustomize first on PYTHONPATH).
    env: extra environment variables. check: fail the test unless the exit code is 0.
    A child still running after `timeout` seconds is killed and the test fails with its output.
    """
    paths = [str(p) for p in pythonpath]
    if block_torch:
        paths.insert(0, str(_blocker_dir()))
    child_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if paths:
        child_env["PYTHONPATH"] = os.pathsep.join(paths)
    child_env.update(env or {})
    try:
        done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=child_env, capture_output=True,
                              text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"python {' '.join(map(str, args))} still running after {timeout} s (killed)\n"
                    f"{out[-2000:]}\n{err[-2000:]}", pytrace=False)
    if check and done.returncode != 0:
        pytest.fail(f"python {' '.join(map(str, args))}: exit {done.returncode}\n{done.stdout[-3000:]}\n"
                    f"{done.stderr[-3000:]}", pytrace=False)
    return done


def assert_one_line_error(done, code=2, *needles):
    """The child failed with exit `code` and exactly one stderr line `error: ...` holding each needle."""
    assert done.returncode == code, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
