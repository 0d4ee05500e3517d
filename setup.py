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
import importlib.util
import os
import shutil
import site
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
        # pip's build isolation hides the target environment's site-packages. Build against that
        # environment's torch anyway, found the way its interpreter finds it: its site-packages
        # with their .pth files, the base interpreter's where a venv includes them, the user's
        # where enabled. Appended last, so the isolated setuptools still wins.
        _add_target_site_dirs()
        try:
            import torch
        except ImportError:
            sys.exit("l2fast: the build cannot find PyTorch: install it first (`pip install torch`); if it is "
                     "installed where pip's isolated build does not look, run `pip install --no-build-isolation .`")
    return torch


def _add_target_site_dirs():
    dirs = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    dirs += site.getsitepackages()  # a --system-site-packages venv lists the base's here
    system_visible = sys.prefix == sys.base_prefix or sys.base_prefix in site.PREFIXES
    if system_visible:  # python looks in the user's site-packages too (pip's PYTHONNOUSERSITE=1 hides it)
        dirs.append(site.getusersitepackages())
    known = {os.path.normcase(os.path.abspath(p)) for p in sys.path}
    for d in dirs:
        if os.path.isdir(d) and os.path.normcase(os.path.abspath(d)) not in known:
            site.addsitedir(d, known)  # appends d, then what its .pth files name


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


def _loaded_libstdcxx():
    """The libstdc++ this interpreter has loaded (torch's, since torch is imported), on Linux; else None.

    _C links against this very file. A compiler that brings its own static libstdc++ (some toolchain
    images do) would otherwise put a second C++ runtime into _C: with Python's -Bsymbolic-functions,
    _C's streams then use its own copy's uninitialised locale, and the first error message that
    formats a number is cut short or crashes the process.
    """
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and "/libstdc++.so" in fields[5] and os.path.isfile(fields[5].strip()):
                    return fields[5].strip()
    except OSError:
        pass
    return None


def _static_libstdcxx_in(so):
    """Whether the built extension defines libstdc++'s own symbols (a static copy); None without `nm`."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    import subprocess

    done = subprocess.run([nm, "-D", "--defined-only", so], capture_output=True, text=True)
    return done.returncode == 0 and "_ZNSt6locale7classicEv" in done.stdout


def _load_cpu_check():
    # The import check uses the same file; load it by path: importing l2fast here would need its _C.
    spec = importlib.util.spec_from_file_location("_l2fast_cpu", ROOT / "l2fast" / "_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

cpu_capability = "DEFAULT" if _flag("L2FAST_PORTABLE") or _load_cpu_check().missing_avx2_features() != [] else "AVX2"
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
    """Also writes l2fast/_build_info.py beside the built _C; l2fast._extension checks it at import."""

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
        # Beside _C wherever it went: build/lib* (then into the wheel), or the checkout for --inplace
        # and editable installs. Nothing is copied into the checkout otherwise: environments that
        # share it would overwrite each other's build (l2fast._extension finds the installed one).
        for ext in self.extensions:
            so = self.get_ext_fullpath(ext.name)
            if _static_libstdcxx_in(so):
                sys.exit(f"l2fast: the C++ compiler linked its own static libstdc++ into {so}, beside the one torch "
                         "loads: error messages would be garbled or crash. Build with the compiler torch was built "
                         "with, e.g. `CC=gcc CXX=g++ pip install --no-build-isolation .`")
            Path(so).with_name("_build_info.py").write_text(text)


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
            extra_link_args=["-fopenmp", *filter(None, [_loaded_libstdcxx()])],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
