"""Loads the compiled l2fast._C, refusing clearly when it is missing or was built for another torch."""
import platform

import torch

REBUILD = "rebuild it from the l2fast source folder: pip install --no-build-isolation --force-reinstall --no-deps ."


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return None


def load():
    """Import l2fast._C (registering torch.ops.l2fast.*) and return its build info as a dict."""
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            "l2fast's compiled extension (l2fast._C) is not built: install the package with `pip install .` "
            "(or `python setup.py build_ext --inplace` for a source checkout)") from None
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"l2fast._C was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} "
            f"is installed; its C++ ABI is not compatible: {REBUILD}")
    if _build_info.CPU_CAPABILITY == "AVX2" and platform.machine() in ("x86_64", "AMD64"):
        flags = _cpu_flags()
        if flags is not None and not {"avx2", "fma", "f16c"} <= flags:
            raise ImportError(f"l2fast._C was built with AVX2/FMA/F16C, which this CPU lacks: {REBUILD} "
                              "with L2FAST_PORTABLE=1 set")
    try:
        from . import _C  # noqa: F401  (importing it registers the ops)
    except ImportError as e:
        raise ImportError(f"l2fast._C failed to load ({e}): {REBUILD}") from e
    return {k.lower(): v for k, v in vars(_build_info).items() if k.isupper()}
