"""Which compiled l2fast._C gets loaded, and the refusals when none fits (l2fast/_extension.py, l2fast/_cpu.py).

Two environments that share one checkout are simulated with two folders of l2fast: the checkout's
(what Python runs from the repo root) and an installed one (a dist-info whose RECORD lists its _C).
"""
import importlib.machinery
import importlib.metadata
import json
import os
import shutil
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import l2fast
import l2fast.ops  # noqa: F401  (loads _C: the tests copy the file it came from)
from l2fast import _cpu, _extension

SO = Path(sys.modules["l2fast._C"].__file__)
BUILD_INFO = (SO.parent / "_build_info.py").read_text()
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
OTHER_TORCH = torch.__version__ + ".other"  # a torch build this interpreter does not have


def _package(dest, build_info=None, so=True):
    """A copy of l2fast's Python sources in dest/l2fast, with a compiled _C and a _build_info.py if asked."""
    src = Path(l2fast.__file__).parent
    shutil.copytree(src, dest / "l2fast", ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py"))
    if build_info is not None:
        (dest / "l2fast" / "_build_info.py").write_text(build_info)
        if so:
            shutil.copyfile(SO, dest / "l2fast" / f"_C{SUFFIX}")
    return dest / "l2fast"


def _install_record(site):
    """Make site/l2fast look installed by pip: a dist-info whose RECORD lists the package's files."""
    dist = site / f"l2fast-{l2fast.__version__}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: l2fast\nVersion: {l2fast.__version__}\n")
    files = sorted(p.relative_to(site).as_posix() for p in (site / "l2fast").rglob("*") if p.is_file())
    (dist / "RECORD").write_text("".join(f"{f},,\n" for f in files) + f"{dist.name}/RECORD,,\n")


def _other_torch(info_text):
    return info_text.replace(repr(torch.__version__), repr(OTHER_TORCH))


PROBE = textwrap.dedent("""
    import json, sys, torch
    import l2fast.ops
    x = torch.arange(1, 301, dtype=torch.float32).reshape(30, 10)[:, ::2]  # a strided view
    print(json.dumps({"package": l2fast.__file__, "so": sys.modules["l2fast._C"].__file__,
                      "value": torch.ops.l2fast.sq_norm([x]).item(),
                      "reference": x.double().pow(2).sum().item()}))
""")


@pytest.fixture(scope="module")
def site_packages(tmp_path_factory):
    """What this interpreter finds beyond its standard library, without any l2fast: links to the rest (torch, ...)."""
    links = tmp_path_factory.mktemp("site-packages")
    stdlib = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    for folder in sys.path:
        if not folder or not Path(folder).is_dir() or folder in stdlib or Path(folder).name == "lib-dynload":
            continue
        for entry in Path(folder).iterdir():
            name = entry.name.lower()
            if not (name.startswith(("l2fast", "__editable__", "_l2fast")) or (links / entry.name).exists()):
                (links / entry.name).symlink_to(entry)
    return links


def _probe(cwd, pythonpath):
    """Run PROBE from cwd (as `python -m ...` from a checkout would) with only pythonpath for site-packages.

    -S: no site-packages of this interpreter, so an l2fast installed in it (CI's) is not seen.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, pythonpath)))
    return subprocess.run([sys.executable, "-S", "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_checkout_loads_this_environments_installed_build(tmp_path, site_packages):
    # The checkout's l2fast/ holds another environment's build (what `pip install .` used to copy
    # there); this environment's `pip install .` put a fitting build in its site-packages.
    tree = _package(tmp_path / "checkout", _other_torch(BUILD_INFO)).parent
    site = _package(tmp_path / "site", BUILD_INFO).parent
    _install_record(site)

    done = _probe(tree, [site, site_packages])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert Path(out["package"]).parent == tree / "l2fast"  # Python ran the checkout's sources
    assert Path(out["so"]).parent == site / "l2fast"  # with this environment's build
    assert out["value"] == pytest.approx(out["reference"], rel=1e-6)


@pytest.mark.parametrize("newer", ["checkout", "installed"])
@pytest.mark.slow
def test_the_newer_of_two_fitting_builds_wins(tmp_path, site_packages, newer):
    # An in-place build in the checkout and an installed one, both for this torch: the newer one was
    # built from the current sources (e.g. a stale copy left in the checkout by an older setup.py).
    tree = _package(tmp_path / "checkout", BUILD_INFO).parent
    site = _package(tmp_path / "site", BUILD_INFO).parent
    _install_record(site)
    old, new = (site, tree) if newer == "checkout" else (tree, site)
    os.utime(old / "l2fast" / f"_C{SUFFIX}", (1_000_000_000, 1_000_000_000))

    done = _probe(tree, [site, site_packages])
    assert done.returncode == 0, done.stderr
    assert Path(json.loads(done.stdout)["so"]).parent == new / "l2fast"


@pytest.mark.slow
def test_no_fitting_build_names_each_and_how_to_rebuild(tmp_path, site_packages):
    tree = _package(tmp_path / "checkout", _other_torch(BUILD_INFO)).parent
    site = _package(tmp_path / "site", _other_torch(BUILD_INFO)).parent
    _install_record(site)

    done = _probe(tree, [site, site_packages])
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    for folder in (tree / "l2fast", site / "l2fast"):
        assert f"l2fast._C ({folder}) was built against torch {OTHER_TORCH} but torch {torch.__version__} is installed" in last
    assert last.endswith("rebuild it from the l2fast source folder: "
                         "pip install --no-build-isolation --force-reinstall --no-deps .")


@pytest.mark.slow
def test_build_info_without_a_build_for_this_python(tmp_path, site_packages):
    # e.g. the checkout was built in place by another Python version: its _C has another suffix.
    tree = _package(tmp_path / "checkout", BUILD_INFO, so=False).parent
    done = _probe(tree, [site_packages])
    assert done.returncode != 0
    assert (f"l2fast._C ({tree / 'l2fast'}) has a _build_info.py but no _C{SUFFIX} built for this Python"
            in done.stderr)


@pytest.mark.slow
def test_not_built_at_all(tmp_path, site_packages):
    tree = _package(tmp_path / "checkout").parent
    done = _probe(tree, [site_packages])
    assert done.returncode != 0
    assert ("l2fast's compiled extension (l2fast._C) is not built: install the package with `pip install .`"
            in done.stderr)


@pytest.mark.skipif(l2fast.build_info()["cpu_capability"] != "AVX2", reason="this _C was built without AVX2")
def test_avx2_build_refused_on_a_cpu_without_it(monkeypatch):
    # The import check asks the same l2fast._cpu that setup.py asked at build time.
    monkeypatch.setattr(_cpu, "missing_avx2_features", lambda cpuinfo=None: ["avx2", "fma"])
    with pytest.raises(ImportError, match=r"was built with AVX2/FMA/F16C, which this CPU lacks \(no avx2, fma\): "
                                          r"rebuild it from the l2fast source folder: L2FAST_PORTABLE=1 pip install"):
        _extension.load()


class TestCpuFeatures:
    FLAGS = "fpu sse2 avx avx2 fma f16c bmi2"

    def _cpuinfo(self, tmp_path, *cores):
        path = tmp_path / "cpuinfo"
        path.write_text("".join(f"processor\t: {i}\nmodel name\t: x\nflags\t\t: {flags}\n\n"
                                for i, flags in enumerate(cores)))
        return str(path)

    @pytest.fixture(autouse=True)
    def _x86(self, monkeypatch):
        monkeypatch.setattr(_cpu.platform, "machine", lambda: "x86_64")

    def test_all_present(self, tmp_path):
        assert _cpu.missing_avx2_features(self._cpuinfo(tmp_path, self.FLAGS, self.FLAGS)) == []

    def test_a_core_without_one(self, tmp_path):
        # Every core must have it: a thread may run anywhere.
        assert _cpu.missing_avx2_features(self._cpuinfo(tmp_path, self.FLAGS, "fpu sse2 avx avx2 f16c")) == ["fma"]

    def test_a_word_elsewhere_is_not_a_flag(self, tmp_path):
        path = tmp_path / "cpuinfo"
        path.write_text("processor\t: 0\nmodel name\t: avx2 fma f16c chip\nflags\t\t: fpu sse2\n")
        assert _cpu.missing_avx2_features(str(path)) == ["avx2", "f16c", "fma"]

    def test_unknown(self, tmp_path, monkeypatch):
        assert _cpu.missing_avx2_features(str(tmp_path / "missing")) is None
        (tmp_path / "noflags").write_text("processor\t: 0\n")
        assert _cpu.missing_avx2_features(str(tmp_path / "noflags")) is None
        monkeypatch.setattr(_cpu.platform, "machine", lambda: "aarch64")
        assert _cpu.missing_avx2_features(self._cpuinfo(tmp_path, self.FLAGS)) is None


def _checkout_root():
    root = Path(__file__).resolve().parents[1]
    if not (root / "setup.py").is_file():
        pytest.skip(f"tests are not in an l2fast checkout ({root} has no setup.py)")
    return root


def test_setup_py_uses_the_shared_cpu_check():
    text = (_checkout_root() / "setup.py").read_text()
    assert '_load("_cpu").missing_avx2_features()' in text
    assert "/proc/cpuinfo" not in text and '"f16c"' not in text  # no second copy of the check


class TestVersion:
    def test_from_the_distribution_metadata(self):
        assert l2fast.__version__ == importlib.metadata.version("l2fast")

    def test_pyproject_is_the_one_source(self):
        root = _checkout_root()
        tomllib = pytest.importorskip("tomllib")  # Python 3.11+
        assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"] == l2fast.__version__
        assert not re.search(r'__version__ = "\d+\.\d', (root / "l2fast" / "__init__.py").read_text())

    def test_uninstalled_source_tree(self, tmp_path):
        tree = _package(tmp_path).parent
        # -S: no site-packages, so no installed l2fast metadata either (importing l2fast needs no torch).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-S", "-c", "import l2fast; print(l2fast.__version__)"],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "0+unknown"


WARN_PROBE = textwrap.dedent("""
    import json, warnings, torch
    torch.cuda.is_available = lambda: {gpu}  # what a machine with a GPU answers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import l2fast.ops
    print(json.dumps([str(w.message) for w in caught if "l2fast" in str(w.message)]))
""")


@pytest.mark.parametrize("gpu, skipped, warned", [
    (True, "nvcc 12.8 (/opt/cuda) cannot build for torch's CUDA: install CUDA 13.x and set CUDA_HOME to it", True),
    (True, None, False),  # the user asked for a CPU-only build (L2FAST_CPU_ONLY=1)
    (False, "no CUDA toolkit found", False),  # no GPU here: the CPU kernels are all it can use
])
def test_cpu_only_build_of_a_cuda_torch_warns_on_a_gpu(tmp_path, site_packages, gpu, skipped, warned):
    # pip shows setup.py's warning only with -v: the import says it where the CUDA kernels are missed.
    info = re.sub(r"(?m)^CUDA = .*$", "CUDA = False", BUILD_INFO) + f"CUDA_SKIPPED = {skipped!r}\n"
    tree = _package(tmp_path / "checkout", info).parent
    env = dict(os.environ, PYTHONPATH=str(site_packages))
    done = subprocess.run([sys.executable, "-S", "-c", WARN_PROBE.format(gpu=gpu)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = [f"l2fast was built without its CUDA kernels, so its ops take CPU tensors only: {skipped}; then "
                f"{_extension.REBUILD}"] if warned else []
    assert json.loads(done.stdout) == expected


def test_build_info_does_not_carry_the_skip_reason():
    assert "cuda_skipped" not in l2fast.build_info()
