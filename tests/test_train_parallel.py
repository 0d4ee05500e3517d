"""torchrun -m l2fast.train --parallel ddp|fsdp on CPU (gloo), 2 ranks, against a one-process run.

Each torchrun is a subprocess with a hard timeout (helpers.run_python kills it and fails the test);
--standalone picks a free rendezvous port, so runs never share one.
"""
import json
import re

import numpy as np
import pytest

from helpers import assert_one_line_error, run_python

STEPS = 120  # logged steps compared (issue 12 item 6); every step is logged
ARGS = ["--dataset", "sample", "--device", "cpu", "--max-steps", str(STEPS), "--log-every", "1", "--no-progress"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "l2fast.train"]
TIMEOUT = 240
RUN_FILES = {"model.pt", "metrics.jsonl", "summary.json", "loss.png"}


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def column(recs, key):
    return np.array([r[key] for r in recs if "step" in r])


def error_lines(done):
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]


def l2fast_traceback(done):
    """A traceback through l2fast's own files (torchrun prints its own for a failed child)."""
    return re.search(r'File "[^"]*/l2fast/[^"]*\.py"', done.stderr)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("single")
    run_python(["-m", "l2fast.train", *ARGS, "--out", "run"], cwd=cwd, check=True, timeout=TIMEOUT)
    return cwd / "run"


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.slow
def test_torchrun_follows_the_single_process_run_step_for_step(tmp_path, single, kind):
    done = run_python([*TORCHRUN, *ARGS, "--parallel", kind, "--out", "run"], cwd=tmp_path, check=True,
                      timeout=TIMEOUT)
    # rank 0 alone prints and writes: one of each line, one run folder, nothing else in the cwd
    assert done.stdout.count("Training process has finished.") == 1, done.stdout
    assert len(re.findall(r"^Loss after mini-batch", done.stdout, re.M)) == STEPS
    assert f"{kind} over 2 rank(s), 32 images each" in done.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"run"}
    assert {p.name for p in (tmp_path / "run").iterdir()} == RUN_FILES
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["parallel"] == {"kind": kind, "world_size": 2}
    assert summary["steps"] == STEPS and summary["penalty"] == "optimizer" and summary["adamw_impl"] == "l2fast"

    got, want = records(tmp_path / "run"), records(single)
    for key in ("loss", "data_loss", "l2_loss"):
        a, b = column(got, key), column(want, key)
        assert len(a) == len(b) == STEPS
        np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=f"{kind}: {key}")
    assert column(want, "loss")[-10:].mean() < column(want, "loss")[:10].mean()  # it trained
    # each epoch's test set, and the weights' Σ‖p‖² (over FSDP2's shards the global value, not rank 0's share)
    epoch_keys = ("test_loss", "test_accuracy", "param_sq_norm")
    test = [[r[k] for k in epoch_keys] for r in got if "test_loss" in r]
    ref = [[r[k] for k in epoch_keys] for r in want if "test_loss" in r]
    np.testing.assert_allclose(test, ref, rtol=1e-4)
    # model.pt holds the whole model (FSDP2's shards gathered), equal to the one-process run's
    import torch

    a = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(single / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_batch_that_does_not_split_over_the_ranks_is_one_error_line(tmp_path):
    done = run_python([*TORCHRUN, *ARGS, "--parallel", "ddp", "--batch-size", "63", "--out", "run"],
                      cwd=tmp_path, timeout=TIMEOUT)
    assert done.returncode != 0  # each rank exits 2; torchrun itself then exits 1 with its report
    assert "exitcode  : 2" in done.stderr, done.stderr[-2000:]
    lines = error_lines(done)
    assert len(lines) == 1 and "--batch-size 63: does not split evenly over 2 ranks" in lines[0], lines
    assert not l2fast_traceback(done), done.stderr[-3000:]
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_an_error_on_rank_0_alone_stops_every_rank(tmp_path):
    """Only rank 0 creates the run folder: its refusal reaches rank 1 (no rank waits in a collective)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    done = run_python([*TORCHRUN, *ARGS, "--parallel", "fsdp", "--out", "run"], cwd=tmp_path, timeout=TIMEOUT)
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr[-2000:]
    lines = error_lines(done)
    assert len(lines) == 1 and "--out run" in lines[0] and "--overwrite" in lines[0], lines
    assert not l2fast_traceback(done), done.stderr[-3000:]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_parallel_without_torchrun_is_a_one_line_error(tmp_path):
    done = run_python(["-m", "l2fast.train", *ARGS, "--parallel", "fsdp"], cwd=tmp_path, timeout=TIMEOUT)
    assert_one_line_error(done, 2, "--parallel fsdp runs under torchrun", "RANK", "--nproc_per_node")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_torchrun_without_parallel_is_refused(tmp_path):
    done = run_python([*TORCHRUN, *ARGS], cwd=tmp_path, timeout=TIMEOUT)
    assert done.returncode != 0
    lines = error_lines(done)
    assert len(lines) == 1 and "started by torchrun as 2 processes but without --parallel" in lines[0], lines
    assert not any(tmp_path.iterdir())
