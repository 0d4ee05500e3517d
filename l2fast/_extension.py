"""Finds and loads the compiled l2fast._C that fits the running torch and CPU, refusing clearly otherwise.

Two places can hold a build, each a `_C<EXT_SUFFIX>` beside the `_build_info.py` setup.py wrote:
- this package's own folder: an installed package, or a checkout built in place
  (`pip install -e .`, `python setup.py build_ext --inplace`);
- the l2fast that `pip install .` put in this environment, when Python runs a checkout's sources
  (`python -m l2fast.train` from the repo root imports ./l2fast). `pip install .` does not copy _C
  into the checkout, so environments sharing one checkout each load their own build.
Where both fit, the newer build wins: it is the one built from the current sources.
"""
import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import warnings
from pathlib import Path, PurePosixPath

import torch

from . import _cpu, _torch_support

INSTALL = "pip install --no-build-isolation --force-reinstall --no-deps ."
REBUILD = f"rebuild it from the l2fast source folder: {INSTALL}"
NOT_BUILT = ("l2fast's compiled extension (l2fast._C) is not built: install the package with `pip install .` "
             "(or `python setup.py build_ext --inplace` for a source checkout)")

_PACKAGE = __name__.rpartition(".")[0]
_MODULE = f"{_PACKAGE}._C"
_PACKAGE_DIR = Path(__file__).resolve().parent


def _so_in(folder):
    """The _C file Python's import system would load from folder (this interpreter's suffixes), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (folder / f"_C{suffix}").is_file():
            return folder / f"_C{suffix}"
    return None


def _read_info(path):
    """A _build_info.py's NAME = literal assignments, as {name.lower(): value}, without importing it."""
    info = {}
    for node in ast.parse(Path(path).read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                info[name.lower()] = ast.literal_eval(node.value)
    return info


def _own_build():
    """(folder, so, info) of this package's own build, or None when it has no _build_info."""
    try:
        from . import _build_info
    except ImportError:
        return None
    info = {k.lower(): v for k, v in vars(_build_info).items() if k.isupper()}
    return _PACKAGE_DIR, _so_in(_PACKAGE_DIR), info


def _installed_builds():
    """(folder, so, info) of each build that an installed l2fast distribution holds outside this package."""
    seen = {_PACKAGE_DIR}
    for dist in importlib.metadata.distributions(name=_PACKAGE):
        for f in dist.files or ():
            parts = PurePosixPath(str(f)).parts
            if len(parts) != 2 or parts[0] != _PACKAGE or parts[1] not in {
                    f"_C{s}" for s in importlib.machinery.EXTENSION_SUFFIXES}:
                continue
            folder = Path(dist.locate_file(f)).resolve().parent
            if folder in seen or not (folder / "_build_info.py").is_file():
                continue
            seen.add(folder)
            try:
                info = _read_info(folder / "_build_info.py")
            except (OSError, SyntaxError, ValueError):
                continue  # not one setup.py wrote
            yield folder, _so_in(folder), info


def _problem(so, info):
    """Why this build cannot load here (one clause), or None when it fits."""
    if so is None:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        return f"has a _build_info.py but no _C{suffix} built for this Python"
    if info.get("torch_version") != torch.__version__:
        return (f"was built against torch {info.get('torch_version')} but torch {torch.__version__} "
                "is installed; its C++ ABI is not compatible")
    if info.get("cpu_capability") == "AVX2":
        missing = _cpu.missing_avx2_features()
        if missing:
            return f"was built with AVX2/FMA/F16C, which this CPU lacks (no {', '.join(missing)})"
    return None


def _import(so):
    """Load the file so as the module l2fast._C (its init function is PyInit__C whatever the file's name)."""
    spec = importlib.util.spec_from_file_location(_MODULE, so)
    try:
        module = importlib.util.module_from_spec(spec)  # dlopen + PyInit__C: registers torch.ops.l2fast.*
        sys.modules[_MODULE] = module
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:
        sys.modules.pop(_MODULE, None)
        raise ImportError(f"l2fast._C ({so}) failed to load ({e}): {REBUILD}") from e
    setattr(sys.modules[_PACKAGE], "_C", module)


def load():
    """Import the l2fast._C that fits (registering torch.ops.l2fast.*) and return its build info as a dict."""
    too_old = _torch_support.problem(torch.__version__)
    if too_old:
        raise ImportError(too_old)
    own = _own_build()
    builds = ([own] if own else []) + list(_installed_builds())
    if not builds:
        raise ImportError(NOT_BUILT)
    problems = [(folder, _problem(so, info)) for folder, so, info in builds]
    fitting = [b for b, (_, why) in zip(builds, problems) if why is None]
    if not fitting:
        why = "; ".join(f"l2fast._C ({folder}) {reason}" for folder, reason in problems)
        portable = "L2FAST_PORTABLE=1 " if "AVX2/FMA/F16C" in why else ""
        raise ImportError(f"{why}: rebuild it from the l2fast source folder: {portable}{INSTALL}")
    folder, so, info = max(fitting, key=lambda b: b[1].stat().st_mtime)  # ties: the first, own folder
    info = dict(info)
    cuda_skipped = info.pop("cuda_skipped", None)
    if _MODULE not in sys.modules:
        _import(so)
        if cuda_skipped and not info.get("cuda") and torch.cuda.is_available():
            # pip hid the build's warning (it shows a build's output only with -v): say it where it matters.
            warnings.warn(f"l2fast was built without its CUDA kernels, so its ops take CPU tensors only: "
                          f"{cuda_skipped}; then {REBUILD}", RuntimeWarning, stacklevel=2)
    return info
