"""The console scripts: each names itself as the user typed it, shows its defaults, and answers
`--help` without importing torch (l2fast-train's --help took 2.4 s importing it)."""
import sys
from pathlib import Path

import pytest

from helpers import PKG_ROOT, run_python

# pyproject.toml's [project.scripts]: the checkout's own, else what the installed package declares
PYPROJECT = PKG_ROOT / "pyproject.toml"


def console_scripts():
    if PYPROJECT.is_file():
        import tomllib

        return tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    from importlib.metadata import entry_points

    return {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("l2fast-")}


SCRIPTS = console_scripts()

# What pip's generated script does, with a check of sys.modules when the interpreter exits.
SHIM = """
import atexit, importlib, sys
atexit.register(lambda: print("torch imported: %s" % ("torch" in sys.modules), file=sys.stderr))
sys.argv[0] = {argv0!r}
module, _, name = {target!r}.partition(":")
sys.exit(getattr(importlib.import_module(module), name)())
"""


def test_there_are_five_scripts():
    assert set(SCRIPTS) == {"l2fast-train", "l2fast-export", "l2fast-infer", "l2fast-bench", "l2fast-selftest"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_names_the_script_and_imports_no_torch(tmp_path, script):
    code = SHIM.format(argv0=str(Path(sys.prefix) / "bin" / script), target=SCRIPTS[script])
    done = run_python(["-c", code, "--help"], cwd=tmp_path, block_torch=True)  # `import torch` fails
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {script} "), done.stdout[:200]
    assert "python -m" not in done.stdout.split("\n\n")[0]  # the usage block
    assert done.stderr.strip().endswith("torch imported: False"), done.stderr


@pytest.mark.parametrize("module, script", [("l2fast.train", "l2fast-train"), ("l2fast.infer", "l2fast-infer"),
                                            ("l2fast.export", "l2fast-export"), ("l2fast.bench", "l2fast-bench"),
                                            ("l2fast.selftest", "l2fast-selftest")])
def test_python_m_names_itself_so_too(tmp_path, module, script):
    done = run_python(["-m", module, "--help"], cwd=tmp_path, block_torch=True)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: python -m {module} "), done.stderr
    assert script not in done.stdout.split("\n\n")[0]


def test_help_shows_the_defaults(tmp_path):
    train = " ".join(run_python(["-m", "l2fast.train", "--help"], cwd=tmp_path).stdout.split())
    assert "cuda or cuda:N (default: auto)" in train  # --device
    bench = " ".join(run_python(["-m", "l2fast.bench", "penalty", "--help"], cwd=tmp_path).stdout.split())
    assert "over (default: 200)" in bench and "kept (default: 7)" in bench  # --tensors, --rounds
    top = run_python(["-m", "l2fast.bench", "--help"], cwd=tmp_path).stdout
    description = top.split("\n\n")[1]
    assert description[0].isalpha(), description  # words, not a code string (`python -m l2fast.bench ...`)


HELP_PAGES = [["l2fast.train"], ["l2fast.export"], ["l2fast.infer"], ["l2fast.selftest"],
              ["l2fast.bench"]] + [["l2fast.bench", b] for b in ("penalty", "optim", "train", "infer")]


@pytest.mark.parametrize("args", HELP_PAGES, ids=" ".join)
def test_help_speaks_about_the_project_not_how_it_was_made(tmp_path, args):
    # `bench optim --help` said "Targets (issue 19, ...)": a user has no issue 19
    import re

    done = run_python(["-m", *args, "--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = re.findall(r"(?i)\b(?:issue|round)s? \d+", done.stdout)
    assert not found, f"{' '.join(args)} --help mentions {found}"


@pytest.mark.parametrize("bench", ["penalty", "optim", "train", "infer"])
def test_bench_subcommand_help_imports_no_torch(tmp_path, bench):
    done = run_python(["-m", "l2fast.bench", bench, "--help"], cwd=tmp_path, block_torch=True)  # `import torch` fails
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m l2fast.bench {bench} "), done.stdout[:200]
