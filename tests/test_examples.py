"""The README's examples, run as the README shows them, so that none can rot.

Each command below must appear, character for character, on a line of a code block in README.md,
docs/*.md or export/README.md (a trailing `# comment` aside), and every such line that runs a file
of examples/ must be one of the commands below. Each test runs its commands with bash in a folder
laid out like the checkout's root (`examples/`, `l2fast/` and `export/README.md` linked or copied
in), with `python` and `torchrun` being this interpreter's. A page that changes a command fails here
until this file follows it.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import PKG_ROOT, run_python

ROOT = Path(__file__).resolve().parents[1]  # the checkout
DOCS = [ROOT / "README.md", ROOT / "export" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 300

pytestmark = pytest.mark.skipif(not (ROOT / "examples").is_dir(),
                                reason=f"tests are not in an l2fast checkout ({ROOT} has no examples/)")


def code_blocks(page, language="[a-z]*"):
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), re.M | re.S)


def shown_commands():
    """Every line of every fenced code block in DOCS, without its `  # comment`."""
    return {re.sub(r"\s+#\s.*$", "", line).strip()
            for page in DOCS for block in code_blocks(page) for line in block.splitlines()}


def assert_shown(*commands):
    shown = shown_commands()
    for command in commands:
        assert command in shown, f"no code block in README.md or docs/ shows `{command}`: update this test"


@pytest.fixture
def checkout(tmp_path):
    """A folder laid out like the checkout's root, where the README's commands run."""
    (tmp_path / "l2fast").symlink_to(ROOT / "l2fast", target_is_directory=True)
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    (tmp_path / "export").mkdir()
    shutil.copy(ROOT / "export" / "README.md", tmp_path / "export" / "README.md")
    return tmp_path


def run(command, cwd):
    """`bash -c command` in cwd with python and torchrun being this interpreter's; output on success."""
    shims = cwd.parent / f"{cwd.name}-bin"
    shims.mkdir(exist_ok=True)
    for name, call in (("python", []), ("torchrun", ["-m", "torch.distributed.run"])):
        (shims / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {" ".join(call)} "$@"\n')
        (shims / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # l2fast as `pip install .` would give it to scripts in examples/ (their own folder is sys.path[0])
    env.update(PATH=f"{shims}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(PKG_ROOT))
    try:
        done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{command}` still running after {TIMEOUT} s (killed)", pytrace=False)
    assert done.returncode == 0, f"`{command}`: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def accuracies(out):
    return [float(a) for a in re.findall(r"test accuracy (\d+\.\d+)%", out)]


def test_the_readme_examples_are_excerpts_of_the_example_files():
    # The README's inline Python is copied from examples/, not retyped: the loop from plain_loop.py,
    # then the optimizer that replaces L2Penalty from fused_adamw.py.
    blocks = code_blocks(ROOT / "README.md", "python")
    files = ["plain_loop.py", "fused_adamw.py"]
    assert len(blocks) == len(files), f"README.md shows {len(blocks)} Python examples; expected one from each of {files}"
    for block, name in zip(blocks, files):
        source = (ROOT / "examples" / name).read_text()
        assert block in source, f"a Python example of README.md is not a verbatim excerpt of examples/{name}:\n{block}"


def plain_loop(out):
    assert len(accuracies(out)) == 2 and accuracies(out)[-1] > 80, out


def decay_groups(out):
    assert "weight 0.0001: 1.weight, 4.weight\nweight 0: 1.bias, 2.weight, 2.bias, 4.bias\n" in out, out
    assert len(accuracies(out)) == 2 and accuracies(out)[-1] > 80, out


def ddp(out):
    assert "2 ranks:" in out and "replicas identical: True" in out, out
    assert accuracies(out)[0] > 80, out


def fused_adamw(out):
    assert ("weight 0.0001: layers.1.weight, layers.3.weight, layers.5.weight\n"
            "weight 0: layers.1.bias, layers.3.bias, layers.5.bias\n") in out, out
    penalties = [float(v) for v in re.findall(r"\+ l2 (\d+\.\d+),", out)]
    assert len(penalties) == 2 and all(v > 0 for v in penalties), out  # optimizer.penalty after each epoch
    assert len(accuracies(out)) == 2 and accuracies(out)[-1] > 80, out


def fsdp(out):
    values = re.search(r"2 ranks: l2 (\S+), (\S+) \(one per rank\)", out)
    assert values and values[1] == values[2], out
    assert accuracies(out)[0] > 80, out


# command as the pages show it -> what its output must show
EXAMPLES = {
    "python examples/plain_loop.py": plain_loop,
    "python examples/decay_groups.py": decay_groups,
    "python examples/fused_adamw.py": fused_adamw,
    "torchrun --standalone --nproc_per_node=2 examples/ddp.py": ddp,
    "torchrun --standalone --nproc_per_node=2 examples/fsdp.py": fsdp,
}


@pytest.mark.slow
@pytest.mark.parametrize("command", EXAMPLES)
def test_example(checkout, command):
    assert_shown(command)
    EXAMPLES[command](run(command, checkout))


EXPORT_AND_INFER = [
    "python -m l2fast.train --out runs/demo --overwrite",
    "python -m l2fast.export runs/demo",
    "python -m l2fast.infer export/model.onnx l2fast/data/mnist_sample/MNIST/raw/t10k-images-idx3-ubyte.gz | tail -n 3",
    "python examples/make_digits.py",
    "python -m l2fast.infer export/model.onnx digits/*.png digits/batch.npy --top-k 3",
    "python examples/predict.py",
]


@pytest.mark.slow
def test_train_export_infer_on_files_that_exist(checkout):
    assert_shown(*EXPORT_AND_INFER)
    train, export, bundled, digits, inferred, predicted = (run(c, checkout) for c in EXPORT_AND_INFER)
    assert "wrote runs/demo" in train
    assert "exported model.onnx" in export and "all argmax equal" in export
    assert {p.name for p in (checkout / "export").iterdir()} == {
        "README.md", "model.onnx", "model.torchscript.pt", "model.pt2", "manifest.json"}
    assert re.search(r"t10k-images-idx3-ubyte\.gz\[1999\]: \d", bundled), bundled  # all 2,000 bundled digits
    assert "batch.npy" in digits
    lines = inferred.splitlines()
    assert len(lines) == 11 + 16, inferred  # 10 digits and the 112-px 7, then the 16 of batch.npy
    assert all(line.count(" | ") == 2 for line in lines), inferred
    assert "of 2,000 bundled test digits right" in predicted
    # predict.py, make_digits.py and the Predictor snippet need no torch: run them with `import torch` failing
    for script in ("examples/predict.py", "examples/make_digits.py"):
        run_python([script], cwd=checkout, block_torch=True, check=True, timeout=TIMEOUT)
    (snippet,) = code_blocks(ROOT / "docs" / "export-and-inference.md", "python")
    done = run_python(["-c", snippet], cwd=checkout, block_torch=True, check=True, timeout=TIMEOUT)
    labels = ast.literal_eval(done.stdout)  # a printed list of 16 label strings
    assert len(labels) == 16 and set(labels) <= set("0123456789"), done.stdout


def test_every_example_the_pages_show_is_run_here():
    tested = {*EXAMPLES, *EXPORT_AND_INFER}
    shown = {line for line in shown_commands() if "examples/" in line}
    assert shown <= tested, f"shown in README.md or docs/ but not run by this file: {sorted(shown - tested)}"
    assert {p.name for p in (ROOT / "examples").glob("*.py")} == {
        re.search(r"examples/(\S+\.py)", c)[1] for c in tested if "examples/" in c}, "an example no test runs"
