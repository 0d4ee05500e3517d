"""python -m l2fast.train and python -m l2fast.bench train, on the bundled sample, on CPU."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from l2fast import train as T
from l2fast.data import load_dataset
from l2fast.model import MLP
from helpers import PKG_ROOT
from test_data import corrupt, write_fake


def _extension_error():
    try:
        import l2fast.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


EXTENSION_ERROR = _extension_error()
# Not a silent skip: -ra lists the reason. Build with `python setup.py build_ext --inplace`.
needs_extension = pytest.mark.skipif(EXTENSION_ERROR is not None,
                                     reason=f"l2fast extension not built ({EXTENSION_ERROR})")


def cli(args, cwd, check=True):
    """Run `python -m l2fast.train ARGS` in cwd; CompletedProcess with text output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PKG_ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def train_in_process(tmp_path, *args):
    """l2fast.train.train() with --out in tmp_path: (summary, metrics records, stdout)."""
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = T.train(T.parse_args(["--out", str(out), "--no-progress", "--device", "cpu", *args]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, records, buf.getvalue()


def step_losses(records, key="loss"):
    return np.array([r[key] for r in records if "step" in r])


@needs_extension
def test_one_epoch_end_to_end(tmp_path):
    done = cli(["l2fast.train", "--epochs", "1", "--log-every", "25", "--device", "cpu"], tmp_path)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("dataset: sample (8,000 train / 2,000 test real MNIST digits bundled with l2fast")
    assert "Starting epoch 1" in lines
    assert "Loss after mini-batch   125: " in done.stdout and "Traceback" not in done.stderr
    (out,) = (tmp_path / "runs").iterdir()  # default --out: a new runs/<timestamp>
    assert {p.name for p in out.iterdir()} == {"model.pt", "metrics.jsonl", "summary.json", "loss.png"}

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == list(range(25, 126, 25)) and all(r["epoch"] == 1 for r in steps)
    assert set(steps[0]) == {"epoch", "step", "loss", "data_loss", "l2_loss"}
    for r in steps:
        assert r["loss"] == pytest.approx(r["data_loss"] + r["l2_loss"], rel=1e-6)
    assert steps[-1]["data_loss"] < steps[0]["data_loss"] - 0.1  # the loss falls
    (epoch,) = [r for r in records if "test_accuracy" in r]
    assert set(epoch) == {"epoch", "test_loss", "test_accuracy", "epoch_seconds", "samples_per_second"}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == epoch["test_accuracy"] > 0.3  # chance is 0.1
    assert summary["penalty"] == "fused" and summary["l2_weight"] == T.DEFAULT_L2_WEIGHT
    assert summary["weight_decay"] == 0.01 and summary["steps"] == 125
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    checkpoint = torch.load(out / "model.pt", weights_only=True)
    assert checkpoint["dataset"] == {"name": "sample", "data_dir": "data"}
    assert checkpoint["train_config"]["l2_weight"] == T.DEFAULT_L2_WEIGHT
    model = MLP(**checkpoint["model_config"])
    model.load_state_dict(checkpoint["state_dict"])
    data = load_dataset("sample")
    with torch.no_grad():
        logits = model(torch.from_numpy(data.test_images).float().div(255))
    accuracy = (logits.argmax(1).numpy() == data.test_labels).mean()
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1.5 / len(data.test_labels))


@needs_extension
def test_penalty_modes_and_adamw_impls_give_the_same_losses(tmp_path):
    runs = {}
    for penalty in T.PENALTIES:
        runs[penalty] = train_in_process(tmp_path, "--penalty", penalty, "--max-steps", "300", "--log-every", "1")
    runs["fused-adamw"] = train_in_process(tmp_path, "--adamw-impl", "fused", "--max-steps", "300",
                                           "--log-every", "1")
    reference = runs["reference"][1]
    assert len(step_losses(reference)) == 300
    for name, (summary, records, _) in runs.items():
        for key in ("loss", "data_loss", "l2_loss"):
            np.testing.assert_allclose(step_losses(records, key), step_losses(reference, key), rtol=1e-5,
                                       err_msg=f"{name} vs reference: {key}")
    assert step_losses(reference)[-20:].mean() < step_losses(reference)[:20].mean()


def test_same_seed_same_losses_and_other_seed_differs(tmp_path):
    args = ("--penalty", "reference", "--max-steps", "150", "--log-every", "10")
    first, second = (train_in_process(tmp_path, *args) for _ in range(2))
    def untimed(records):
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "samples_per_second")} for r in records]

    assert untimed(first[1]) == untimed(second[1])
    np.testing.assert_array_equal(step_losses(first[1]), step_losses(second[1]))
    other = train_in_process(tmp_path, *args, "--seed", "7")
    assert not np.array_equal(step_losses(first[1]), step_losses(other[1]))


def test_max_steps_partial_epoch_and_metrics_path(tmp_path):
    metrics = tmp_path / "m" / "log.jsonl"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        summary = T.train(T.parse_args(["--penalty", "reference", "--max-steps", "130", "--out", str(tmp_path / "o"),
                                        "--device", "cpu",
                                        "--metrics", str(metrics), "--no-progress", "--batch-size", "64"]))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    # default --log-every: 25 when an epoch (the sample's: 125 steps) is shorter than the notebook's 500
    assert [(r["epoch"], r.get("step")) for r in records] == [(1, s) for s in (25, 50, 75, 100, 125)] + [
        (1, None), (2, None)]
    assert "test_accuracy" in records[5] and "test_accuracy" in records[6]
    assert summary["steps"] == 130 and summary["epochs"] == 2
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
    assert "Starting epoch 2" in buf.getvalue() and "Starting epoch 3" not in buf.getvalue()


def test_seed_l2_weight_drives_weights_toward_zero(tmp_path):
    default, _, _ = train_in_process(tmp_path, "--penalty", "reference", "--epochs", "2")
    seed, _, _ = train_in_process(tmp_path, "--penalty", "reference", "--epochs", "2", "--l2-weight", "1.0")
    assert seed["param_sq_norm"] < 0.3 * default["param_sq_norm"]
    assert seed["test_accuracy"] < 0.2 < default["test_accuracy"]


def test_device_batches_are_totensor_values():
    data = load_dataset("sample")
    images = data.train_images[:64]
    expected = torch.stack([transforms.ToTensor()(Image.fromarray(x, mode="L")) for x in images])
    ours = T.scale_images(torch.from_numpy(images))
    assert torch.equal(ours, expected.squeeze(1))


def test_last_partial_batch_is_kept(tmp_path):
    summary, records, out = train_in_process(tmp_path, "--penalty", "reference", "--batch-size", "3000",
                                             "--epochs", "1", "--log-every", "1")
    assert [r["step"] for r in records if "step" in r] == [1, 2, 3]  # 3000 + 3000 + 2000
    assert summary["steps"] == 3
    assert "Loss after mini-batch     3: " in out


@pytest.mark.parametrize("case", ["magic", "truncated", "count", "label-range", "missing"])
def test_bad_data_exits_2_with_one_line(tmp_path, case):
    bad = corrupt(write_fake(tmp_path / "data"), case)
    done = cli(["l2fast.train", "--dataset", "mnist", "--epochs", "1"], tmp_path, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: ") and str(Path("data") / "MNIST" / "raw" / bad.name) in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist"], "--download"),
    (["--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "--device cuda"),
    (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
    (["--device", "tpu"], "--device tpu"),
    (["--dataset", "sample", "--download"], "--download"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, args, message):
    done = cli(["l2fast.train", *args], tmp_path, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and message in done.stderr and done.stderr.count("\n") == 1


def test_cli_entry_point_in_process(capsys):
    assert T.cli(["--device", "cpu", "--cuda-graphs"]) == 2
    assert capsys.readouterr().err.startswith("error: --cuda-graphs")


@needs_extension
@pytest.mark.slow
def test_compile_on_cpu_matches_eager(tmp_path):
    eager = train_in_process(tmp_path, "--max-steps", "40", "--log-every", "1")
    compiled = train_in_process(tmp_path, "--max-steps", "40", "--log-every", "1", "--compile")
    np.testing.assert_allclose(step_losses(compiled[1]), step_losses(eager[1]), rtol=1e-5)


@needs_extension
def test_bench_train_runs(tmp_path):
    done = cli(["l2fast.bench", "train", "--steps", "6", "--warmup", "2", "--rounds", "2"], tmp_path)
    assert "notebook DataLoader num_workers=0" in done.stdout
    assert "fewer ms per step than the notebook's loop" in done.stdout and "5 epochs (4,690 steps)" in done.stdout
    done = cli(["l2fast.bench", "train", "--device", "cpu", "--cuda-graphs"], tmp_path, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr


@needs_extension
@pytest.mark.cuda
def test_cuda_graphs_and_compile_match_the_plain_cuda_path(tmp_path):
    # batch 96 leaves a partial last batch (8,000 = 83 * 96 + 32): it runs eagerly between replays
    def run_cuda(*extra):
        out = tmp_path / f"cuda{len(list(tmp_path.glob('cuda*')))}"
        with contextlib.redirect_stdout(io.StringIO()):
            T.train(T.parse_args(["--out", str(out), "--no-progress", "--device", "cuda", "--batch-size", "96",
                                  "--epochs", "2", "--log-every", "1", *extra]))
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    plain = run_cuda()
    assert len(step_losses(plain)) == 2 * 84
    for extra in (["--cuda-graphs"], ["--compile"], ["--cuda-graphs", "--penalty", "reference"]):
        np.testing.assert_allclose(step_losses(run_cuda(*extra)), step_losses(plain), rtol=1e-5,
                                   err_msg=" ".join(extra))
