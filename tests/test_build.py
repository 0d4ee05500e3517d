"""setup.py as pip runs it: finding torch past build isolation, and what `pip install .` leaves in the checkout.

Each test makes a fresh virtual environment whose torch comes from this interpreter in one of the
layouts people have, and runs pip in it with build isolation (pip fetches setuptools, wheel and
ninja from its configured index).
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCH_SITE = Path(torch.__file__).resolve().parents[1]  # the folder holding torch/
BASE_SITE = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})["purelib"])
# At the checkout's root only: l2fast/data holds the bundled sample and must be copied.
_ROOT_ONLY = {".git", "build", "dist", "runs", "export", "data", ".hypothesis", ".pytest_cache"}
_ANYWHERE = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "_build_info.py")

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").is_file(),
                                reason=f"tests are not in an l2fast checkout ({ROOT} has no setup.py)")


def _checkout(dest):
    """A copy of the checkout as a user has it: sources only, nothing built."""
    def ignore(folder, names):
        return set(_ANYWHERE(folder, names)) | (_ROOT_ONLY & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _venv(path, layout):
    """A venv whose torch is this interpreter's: through a .pth file, or as a --system-site-packages venv."""
    if layout == "system-site-packages" and TORCH_SITE != BASE_SITE.resolve():
        pytest.skip(f"torch is not in the base interpreter's site-packages ({BASE_SITE})")
    flags = ["--system-site-packages"] if layout == "system-site-packages" else []
    subprocess.run([sys.executable, "-m", "venv", *flags, str(path)], check=True, timeout=300)
    python = path / "bin" / "python"
    if layout == "pth":
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True, timeout=60).stdout.strip()
        Path(purelib, "outer.pth").write_text(f"{TORCH_SITE}\n")
    return python


def _pip(python, *args, cwd, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(L2FAST_CPU_ONLY="1", MAX_JOBS=env.get("MAX_JOBS", "2"), PIP_DISABLE_PIP_VERSION_CHECK="1", **extra_env)
    return subprocess.run([str(python), "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1500)


@pytest.mark.parametrize("layout", ["pth", "system-site-packages"])
@pytest.mark.slow
def test_pip_finds_torch_past_build_isolation(tmp_path, layout):
    # --dry-run stops after "Getting requirements to build wheel" and "Preparing metadata", which
    # run all of setup.py (torch's import included) in pip's isolated build environment.
    python = _venv(tmp_path / "venv", layout)
    done = _pip(python, "install", "--dry-run", "--no-deps", ".", cwd=_checkout(tmp_path / "checkout"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Would install l2fast" in done.stdout


@pytest.mark.slow
def test_no_torch_anywhere_is_one_line_naming_no_build_isolation(tmp_path):
    python = _venv(tmp_path / "venv", "bare")
    done = _pip(python, "install", "--dry-run", "--no-deps", ".", cwd=_checkout(tmp_path / "checkout"))
    assert done.returncode != 0
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if "l2fast:" in line]
    assert lines == ["l2fast: the build cannot find PyTorch: install it first (`pip install torch`); if it is "
                     "installed where pip's isolated build does not look, run `pip install --no-build-isolation .`"]


PROBE = textwrap.dedent("""
    import json, sys, torch
    import l2fast.ops

    def error():  # a message the C++ code formats with numbers in it
        try:
            torch.ops.l2fast.sq_norm([torch.zeros(2), torch.zeros(3, dtype=torch.int32)])
        except TypeError as e:
            return str(e).splitlines()[0]

    x = torch.linspace(-3, 3, 4001)[1::4]
    print(json.dumps({"package": l2fast.__file__, "so": sys.modules["l2fast._C"].__file__,
                      "value": torch.ops.l2fast.sq_norm([x]).item(), "reference": x.double().pow(2).sum().item(),
                      "error": error()}))
""")


@pytest.mark.slow
def test_pip_install_builds_into_the_environment_not_the_checkout(tmp_path):
    # The README's `pip install .`, in a venv whose torch comes through a .pth file. The checkout is
    # shared by every environment, so the build must land in this venv only; Python run from the
    # checkout's root (the README's `python -m l2fast.train`) still finds it.
    python = _venv(tmp_path / "venv", "pth")
    checkout = _checkout(tmp_path / "checkout")
    # Linked as on the GPU machine's toolchain, whose compiler brings its own static libstdc++, with
    # Python's -Bsymbolic-functions: a second C++ runtime in _C cut every error message at its first number.
    done = _pip(python, "install", "--no-deps", ".", cwd=checkout,
                LDFLAGS="-static-libstdc++ -Wl,-Bsymbolic-functions")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list((checkout / "l2fast").glob("_C*")) and not (checkout / "l2fast" / "_build_info.py").exists()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(python), "-c", PROBE], cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert Path(out["package"]).parent == checkout / "l2fast"
    assert Path(out["so"]).parent.parent.resolve() == Path(
        subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
                       capture_output=True, text=True, check=True, timeout=60).stdout.strip()).resolve()
    assert out["value"] == pytest.approx(out["reference"], rel=1e-6)
    assert out["error"] == ("l2fast.sq_norm: tensors[1] has dtype Int; expected a floating-point tensor "
                            "(float32, float64, float16 or bfloat16)")


def _fake_toolkit(folder, release):
    """A CUDA_HOME whose nvcc reports release (what setup.py asks before choosing a toolkit)."""
    (folder / "bin").mkdir(parents=True)
    nvcc = folder / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    f"echo 'Cuda compilation tools, release {release}, V{release}.99'\n")
    nvcc.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    return _checkout(tmp_path_factory.mktemp("setup") / "checkout")


def _setup_py(checkout, cuda_home, **env_extra):
    """`python setup.py --version` in a copy of the checkout: runs setup.py's checks and plan, builds nothing."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "L2FAST_CPU_ONLY", "L2FAST_REQUIRE_CUDA", "CUDA_PATH")}
    env.update(CUDA_HOME=str(cuda_home), **env_extra)
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=checkout, env=env, capture_output=True,
                          text=True, timeout=600)


needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="torch has no CUDA: setup.py builds the CPU only")
TORCH_CUDA = torch.version.cuda
TORCH_MAJOR = int(TORCH_CUDA.split(".")[0]) if TORCH_CUDA else None
WANTED = f"install CUDA {TORCH_MAJOR}.x (torch {torch.__version__} was built with CUDA {TORCH_CUDA})"
HINT = "(L2FAST_CPU_ONLY=1 asks for a CPU-only build without this warning; L2FAST_REQUIRE_CUDA=1 makes it an error)"


@pytest.mark.slow  # each runs setup.py, which imports torch: a few seconds
@needs_cuda_torch
class TestCudaToolkitChoice:
    """A CUDA build that cannot work becomes a CPU-only build with one warning line, or with
    L2FAST_REQUIRE_CUDA=1 a one-line failure; pip install . never fails for it."""

    def _lines(self, done):
        return [line for line in done.stderr.splitlines() if line.startswith("l2fast:")]

    def test_nvcc_of_another_major_version_warns_and_builds_for_the_cpu(self, tmp_path, checkout):
        home = _fake_toolkit(tmp_path / "cuda", f"{TORCH_MAJOR - 1}.8")
        done = _setup_py(checkout, home)
        assert done.returncode == 0, done.stderr
        assert self._lines(done) == [
            f"l2fast: WARNING: building the CPU kernels only: nvcc {TORCH_MAJOR - 1}.8 ({home}) cannot build for "
            f"torch's CUDA: {WANTED} and set CUDA_HOME to it {HINT}"]

    def test_required_cuda_fails_in_one_line_saying_why(self, tmp_path, checkout):
        home = _fake_toolkit(tmp_path / "cuda", f"{TORCH_MAJOR + 1}.0")
        done = _setup_py(checkout, home, L2FAST_REQUIRE_CUDA="1")
        assert done.returncode != 0
        assert self._lines(done) == [
            f"l2fast: L2FAST_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: nvcc {TORCH_MAJOR + 1}.0 ({home}) "
            f"cannot build for torch's CUDA: {WANTED} and set CUDA_HOME to it"]

    def test_no_toolkit(self, tmp_path, checkout):
        done = _setup_py(checkout, tmp_path / "no-cuda-here")
        assert done.returncode == 0, done.stderr
        assert self._lines(done) == [
            f"l2fast: WARNING: building the CPU kernels only: no CUDA toolkit found (no nvcc in "
            f"CUDA_HOME={tmp_path / 'no-cuda-here'}): {WANTED} and set CUDA_HOME to it {HINT}"]

    def test_another_minor_version_of_torchs_major_is_used(self, tmp_path, checkout):
        # e.g. nvcc 13.0 for torch's CUDA 13.2: the toolkit's own headers, the missing library headers from pip's.
        minor = 9 if TORCH_CUDA.split(".")[1] != "9" else 8
        done = _setup_py(checkout, _fake_toolkit(tmp_path / "cuda", f"{TORCH_MAJOR}.{minor}"))
        assert done.returncode == 0, done.stderr
        assert self._lines(done) == []

    def test_asked_for_the_cpu_only_no_warning(self, tmp_path, checkout):
        done = _setup_py(checkout, tmp_path / "no-cuda-here", L2FAST_CPU_ONLY="1")
        assert done.returncode == 0, done.stderr
        assert self._lines(done) == []

    def test_cpu_only_with_required_cuda_contradicts(self, tmp_path, checkout):
        done = _setup_py(checkout, tmp_path / "no-cuda-here", L2FAST_CPU_ONLY="1", L2FAST_REQUIRE_CUDA="1")
        assert done.returncode != 0
        assert self._lines(done) == ["l2fast: L2FAST_REQUIRE_CUDA=1 contradicts L2FAST_CPU_ONLY=1"]


@pytest.mark.slow  # runs setup.py, which imports torch
def test_build_against_an_older_torch_refused_in_one_line(tmp_path, checkout):
    (tmp_path / "sitecustomize.py").write_text("import torch\ntorch.__version__ = '2.10.0+cu128'\n")
    done = _setup_py(checkout, tmp_path / "no-cuda-here", PYTHONPATH=str(tmp_path))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "l2fast needs torch >= 2.11 (tested: 2.11.0, 2.14.1 and 2.15.0); torch 2.10.0+cu128 is installed: "
        "pip install 'torch>=2.11'")
