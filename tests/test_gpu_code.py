"""Code that runs only where there is a GPU, checked here without one.

The self-test's CUDA checks, the sanitizer driver and scripts/gpu_measure.py skip on a machine
without CUDA, so no CPU run executes their bodies; GPU time is short and a crash there wastes it
(a check unpacked two values from a function that returns three). pylint finds that class of error
without running the code: wrong unpacking, undefined or unassigned names, calls that do not match
the signature they call."""
import subprocess
import sys
from pathlib import Path

import pytest

import l2fast

pytest.importorskip("pylint")

PACKAGE = Path(l2fast.__file__).resolve().parent
CHECKOUT = Path(__file__).resolve().parents[1]

# errors pylint reports from the code alone, with no false positive on l2fast's code
CHECKS = ("unbalanced-tuple-unpacking,unpacking-non-sequence,undefined-variable,used-before-assignment,"
          "no-name-in-module,too-many-function-args,unexpected-keyword-arg,no-value-for-parameter,"
          "not-an-iterable,unsubscriptable-object")

# What only a GPU runs, and what it calls into.
GPU_ONLY = [PACKAGE / "selftest", PACKAGE / "bench", PACKAGE / "engine.py", PACKAGE / "optim.py",
            PACKAGE / "penalty.py", PACKAGE / "functional.py", CHECKOUT / "scripts" / "gpu_measure.py"]


def pylint(paths, cwd):
    return subprocess.run([sys.executable, "-m", "pylint", "--disable=all", f"--enable={CHECKS}",
                           "--score=n", "--persistent=n", *map(str, paths)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_gpu_only_code_has_no_static_errors(tmp_path):
    paths = [p for p in GPU_ONLY if p.exists()]
    assert PACKAGE / "selftest" in paths
    result = pylint(paths, tmp_path)
    assert result.returncode == 0, f"pylint found errors in GPU-only code:\n{result.stdout}{result.stderr}"


def test_the_check_finds_a_wrong_unpacking(tmp_path):
    # the error that was in checks_optim.one_launch_check: two names for three values
    bad = tmp_path / "bad.py"
    bad.write_text("def events():\n    return [], [], []\n\n\ndef check():\n    kernels, copies = events()\n"
                   "    return kernels, copies\n")
    result = pylint([bad], tmp_path)
    assert result.returncode != 0 and "unbalanced-tuple-unpacking" in result.stdout, result.stdout
