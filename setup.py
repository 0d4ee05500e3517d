"""Builds l2fast._C against the torch already installed in the target environment.

Environment variables:
  L2FAST_CPU_ONLY=1       build the CPU kernels only, even where nvcc and a CUDA torch exist
  L2FAST_REQUIRE_CUDA=1   fail unless the CUDA kernels are built (CI sets this)
  L2FAST_PORTABLE=1       no -mavx2/-mfma/-mf16c: a build that runs on any x86-64 CPU
  CUDA_HOME               the CUDA toolkit (default: /usr/local/cuda, then /usr/local/cuda-*)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: the visible GPUs', or "9.0+PTX" when none is visible)
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _import_torch():
    try:
        import torch
    except ImportError:
        # pip's build isolation hides the target environment's site-packages; build against
        # its torch anyway (appended last, so the isolated setuptools still wins).
        for key in ("purelib", "platlib"):
            path = sysconfig.get_paths()[key]
            if path not in sys.path:
                sys.path.append(path)
        try:
            import torch
        except ImportError:
            sys.exit("l2fast: building needs PyTorch installed first, e.g. `pip install torch`")
    return torch


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    # torch guesses from `which nvcc`, which is wrong when nvcc on PATH is a wrapper script.
    for cand in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]:
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _cpu_has_avx2():
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


torch = _import_torch()
cuda_home = None if _flag("L2FAST_CPU_ONLY") else _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension reads it
from torch.utils import cpp_extension  # noqa: E402

with_cuda = bool(cuda_home and torch.version.cuda and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
if _flag("L2FAST_REQUIRE_CUDA") and not with_cuda:
    sys.exit(f"l2fast: L2FAST_REQUIRE_CUDA=1 but cannot build CUDA kernels "
             f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home})")
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"  # H100/H200, plus PTX for newer GPUs

cpu_capability = "AVX2" if (_cpu_has_avx2() and not _flag("L2FAST_PORTABLE")) else "DEFAULT"
cxx_flags = ["-O3", "-fopenmp", "-Wno-unknown-pragmas"]  # torch adds the -std it needs
if cpu_capability == "AVX2":
    # at::vec's AVX2 Vectorized<T> lives in its own inline namespace, so this does not clash
    # with libtorch's copies; the import-time check refuses a CPU without AVX2.
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
nvcc_flags = ["-O3", "-lineinfo"]  # no --use_fast_math: it flushes float32 subnormals to zero

sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
include_dirs = [str(ROOT / "csrc")]
if with_cuda:
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    if not os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        # ATen/cuda headers include the CUDA library headers; pip's nvidia wheels carry them.
        site = Path(torch.__file__).resolve().parent.parent
        include_dirs += sorted(str(p) for p in site.glob("nvidia/cu*/include"))
        include_dirs += sorted(str(p) for p in site.glob("nvidia/*/include") if not p.parent.name.startswith("cu1"))
    Extension = cpp_extension.CUDAExtension
    define_macros = [("WITH_CUDA", None)]
else:
    Extension = cpp_extension.CppExtension
    define_macros = []


class BuildExtension(cpp_extension.BuildExtension):
    """Also writes l2fast/_build_info.py, which the package checks at import."""

    def run(self):
        super().run()
        info = {
            "torch_version": torch.__version__,
            "cuda": with_cuda,
            "cuda_version": torch.version.cuda if with_cuda else None,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
            "cpu_capability": cpu_capability,
        }
        text = '"""Written by setup.py at build time; checked by l2fast._extension at import."""\n'
        text += "".join(f"{k.upper()} = {v!r}\n" for k, v in info.items())
        (Path(self.build_lib) / "l2fast").mkdir(parents=True, exist_ok=True)
        (Path(self.build_lib) / "l2fast" / "_build_info.py").write_text(text)
        # `python -m l2fast.train` run from the checkout imports ./l2fast, not the installed copy:
        # give the checkout the same compiled _C (what `build_ext --inplace` does; both are gitignored).
        try:
            for ext in self.extensions:
                built = Path(self.get_ext_fullpath(ext.name))
                if not self.inplace:
                    shutil.copyfile(built, ROOT / "l2fast" / built.name)
            (ROOT / "l2fast" / "_build_info.py").write_text(text)
        except OSError as e:
            print(f"l2fast: could not copy the extension into the source tree ({e}); "
                  "run commands from outside it", file=sys.stderr)


setup(
    packages=find_packages(include=["l2fast", "l2fast.*"]),
    package_data={"l2fast": ["data/mnist_sample/**/*", "data/mnist_sample/*"]},
    ext_modules=[
        Extension(
            "l2fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
