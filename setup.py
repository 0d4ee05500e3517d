"""Builds l2fast._C against the torch already installed in the target environment.

Environment variables:
  L2FAST_CPU_ONLY=1       build the CPU kernels only, even where nvcc and a CUDA torch exist
  L2FAST_REQUIRE_CUDA=1   fail unless the CUDA kernels are built (CI sets this); without it, a CUDA
                          build that cannot work (no nvcc, or nvcc of another CUDA major version than
                          torch's) becomes a CPU-only build with a warning saying why and what to do
  L2FAST_PORTABLE=1       no -mavx2/-mfma/-mf16c: a build that runs on any x86-64 CPU
  CUDA_HOME               the CUDA toolkit (default: the first of /usr/local/cuda, /usr/local/cuda-*
                          (newest first) and the nvcc on PATH whose CUDA major version is torch's)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: the visible GPUs', or "9.0+PTX" when none is visible)
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import importlib.util
import os
import re
import shutil
import site
import subprocess
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


def _cuda_home_env():
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")


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
    done = subprocess.run([nm, "-D", "--defined-only", so], capture_output=True, text=True)
    return done.returncode == 0 and "_ZNSt6locale7classicEv" in done.stdout


def _cuda_homes():
    """The CUDA toolkits to consider: CUDA_HOME (or CUDA_PATH) alone when set, else the usual places."""
    homes = [_cuda_home_env()] if _cuda_home_env() else [
        "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    # torch guesses from `which nvcc`, which is wrong when nvcc on PATH is a wrapper script: last resort.
    nvcc = None if _cuda_home_env() else shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    return [h for h in dict.fromkeys(homes) if os.path.exists(os.path.join(h, "bin", "nvcc"))]


def _release(text, after=""):
    """(major, minor) of the first 'X.Y' in text (right after `after`), or None."""
    match = re.search(after + r"(\d+)\.(\d+)", text or "")
    return (int(match[1]), int(match[2])) if match else None


def _nvcc_release(home):
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=120).stdout  # "... Cuda compilation tools, release 13.0, V13.0.88"
    except (OSError, subprocess.SubprocessError):
        return None
    return _release(out, after="release ")


def _plan_cuda():
    """(toolkit folder, nvcc (major, minor)) to build the CUDA kernels with, or (None, why not) in one line.

    nvcc must be of torch's CUDA major version: torch's CUDA libraries (and so its kernels' runtime)
    are versioned by major. A different minor version works: the toolkit's own headers are used.
    """
    torch_cuda = _release(torch.version.cuda)
    if torch_cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
    wanted = f"CUDA {torch_cuda[0]}.x (torch {torch.__version__} was built with CUDA {torch.version.cuda})"
    found = [(home, _nvcc_release(home)) for home in _cuda_homes()]
    same_major = [(home, release) for home, release in found if release and release[0] == torch_cuda[0]]
    if same_major:
        home, release = next((m for m in same_major if m[1] == torch_cuda), same_major[0])
        if release < (12, 1):  # the kernels pass 32 KB of parameters
            return None, f"nvcc {release[0]}.{release[1]} ({home}) is older than CUDA 12.1: install {wanted}"
        return home, release
    if not found:
        where = f"CUDA_HOME={_cuda_home_env()}" if _cuda_home_env() else "/usr/local/cuda*/bin or on PATH"
        return None, f"no CUDA toolkit found (no nvcc in {where}): install {wanted} and set CUDA_HOME to it"
    home, release = found[0]
    nvcc = f"nvcc {release[0]}.{release[1]}" if release else "an nvcc that does not say its version"
    return None, f"{nvcc} ({home}) cannot build for torch's CUDA: install {wanted} and set CUDA_HOME to it"


def _load(name):
    # The import-time checks use the same files; load them by path: importing l2fast here would need its _C.
    spec = importlib.util.spec_from_file_location(f"_l2fast{name}", ROOT / "l2fast" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torch = _import_torch()
too_old = _load("_torch_support").problem(torch.__version__)
if too_old:
    sys.exit(too_old)
cuda_home, nvcc_or_reason = (None, None) if _flag("L2FAST_CPU_ONLY") else _plan_cuda()
with_cuda = cuda_home is not None
cuda_skipped = None if with_cuda else nvcc_or_reason  # None where the user asked for the CPU only
if cuda_skipped and _flag("L2FAST_REQUIRE_CUDA"):
    sys.exit(f"l2fast: L2FAST_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: {cuda_skipped}")
if _flag("L2FAST_REQUIRE_CUDA") and not with_cuda:
    sys.exit("l2fast: L2FAST_REQUIRE_CUDA=1 contradicts L2FAST_CPU_ONLY=1")
if cuda_skipped and torch.version.cuda:
    print(f"l2fast: WARNING: building the CPU kernels only: {cuda_skipped} (L2FAST_CPU_ONLY=1 asks for a CPU-only "
          "build without this warning; L2FAST_REQUIRE_CUDA=1 makes it an error)", file=sys.stderr, flush=True)
if with_cuda:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension reads it
from torch.utils import cpp_extension  # noqa: E402

if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"  # H100/H200, plus PTX for newer GPUs

cpu_capability = "DEFAULT" if _flag("L2FAST_PORTABLE") or _load("_cpu").missing_avx2_features() != [] else "AVX2"
# -g0 overrides the -g in Python's CFLAGS: debug info for torch's headers was half of the C++
# compile time (python.cpp: 41 s -> 19 s of CPU) and 90% of _C's size. torch adds the -std it needs.
cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas"]
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
    Extension = cpp_extension.CUDAExtension
    define_macros = [("WITH_CUDA", None)]
else:
    Extension = cpp_extension.CppExtension
    define_macros = []


def _link_missing_headers(dest):
    """Fill dest with links to the headers that torch's pip nvidia packages carry and the toolkit lacks.

    ATen/cuda's headers include the CUDA libraries' (cusparse.h, cublas_v2.h, ...), which a bare
    toolkit may not have. Those packages also carry the CUDA runtime's headers of torch's CUDA
    version; put on the include path they would shadow the toolkit's own, and nvcc refuses
    headers of another version than its own ("CUDA compiler and CUDA toolkit headers are incompatible").
    """
    have = set(os.listdir(os.path.join(cuda_home, "include")))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    torch_site = Path(torch.__file__).resolve().parent.parent
    for folder in sorted(torch_site.glob("nvidia/*/include")):
        for entry in sorted(folder.iterdir()):
            if entry.name not in have and not (dest / entry.name).exists():
                (dest / entry.name).symlink_to(entry)
    return dest


class BuildExtension(cpp_extension.BuildExtension):
    """Also writes l2fast/_build_info.py beside the built _C; l2fast._extension checks it at import."""

    def build_extensions(self):
        if with_cuda:
            extra = str(_link_missing_headers(Path(self.build_temp).resolve() / "cuda-library-headers"))
            for ext in self.extensions:
                ext.include_dirs.append(extra)  # after the toolkit's: it only adds, never shadows
        super().build_extensions()

    def run(self):
        if with_cuda:  # pip shows a build's output only with -v, or when it fails
            print(f"l2fast: building the CPU and CUDA kernels with nvcc {nvcc_or_reason[0]}.{nvcc_or_reason[1]} "
                  f"({cuda_home}) for torch {torch.__version__}, archs {os.environ.get('TORCH_CUDA_ARCH_LIST')}: "
                  "several minutes on 2 cores (L2FAST_CPU_ONLY=1: the CPU kernels only, faster)",
                  file=sys.stderr, flush=True)
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
        text += f"CUDA_SKIPPED = {cuda_skipped!r}  # why a CUDA torch got no CUDA kernels: warned at import on a GPU\n"
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
