"""The penalty on FSDP2, HSDP and DDP: gloo processes on CPU, against an unsharded float64 reference.

Every spawned process has a 60 s collective timeout and the parent kills them all after
PROCESS_TIMEOUT_S, so a hang fails the test instead of CI.
"""
import multiprocessing
import queue as queue_module
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dist_workers as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="torch.distributed with gloo is needed")
PROCESS_TIMEOUT_S = 180


def spawn(scenario, world, tmp_path):
    """Runs dist_workers.<scenario> on `world` gloo ranks; returns the per-rank results, rank order."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_file = Path(tmp_path) / "rendezvous"
    procs = [ctx.Process(target=W.run, args=(scenario, r, world, str(init_file), results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        while len(got) < world:
            try:
                rank, status, payload = results.get(timeout=PROCESS_TIMEOUT_S)
            except queue_module.Empty:
                pytest.fail(f"{scenario}: no result from ranks {sorted(set(range(world)) - set(got))} "
                            f"within {PROCESS_TIMEOUT_S} s")
            if status != "ok":
                pytest.fail(f"{scenario}: rank {rank} failed:\n{payload}")
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return [got[r] for r in range(world)]


def reference():
    """The unsharded model in float64: penalised params, value, data grads of the full batch."""
    model = W.uneven_mlp().double()
    decay = [p.dim() >= 2 and not isinstance(m, nn.LayerNorm) for m in model for p in m.parameters(recurse=False)]
    params = [p for p in model.parameters()]
    value = W.WEIGHT * sum((p.detach() ** 2).sum().item() for p, d in zip(params, decay) if d)
    x, y = (t.double() for t in W.batch())
    nn.functional.mse_loss(model(x), y).backward()
    penalty_grads = [(2 * W.WEIGHT * p.detach() if d else None) for p, d in zip(params, decay)]
    return value, params, penalty_grads


def close(got, want, what, rtol=1e-5, atol=1e-7):
    if want is None:
        assert got is None, f"{what}: expected no grad, got one"
        return
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want.detach(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def check_rounds(results):
    value, params, penalty_grads = reference()
    for rank, r in enumerate(results):
        assert r["value_type"] == "Tensor"  # a plain tensor, not a DTensor
        for key in ("value", "add_grad_value", "fresh_value", "functional_value", "term_value"):
            assert r[key] == pytest.approx(value, rel=1e-5), f"rank {rank} {key}"
        for i, (p, pg) in enumerate(zip(params, penalty_grads)):
            data_grad = p.grad
            close(r["data_grads"][i], data_grad, f"rank {rank} param {i} data grad")
            close(r["grads_after"][i], data_grad + (pg if pg is not None else 0), f"rank {rank} param {i} after")
            close(r["fresh_grads"][i], pg, f"rank {rank} param {i} fresh")
            close(r["functional_grads"][i], None if pg is None else 2 * pg, f"rank {rank} param {i} functional")
            close(r["term_grads"][i], pg, f"rank {rank} param {i} differentiable")


@pytest.mark.slow
def test_fsdp2_two_ranks_uneven_and_empty_shards(tmp_path):
    results = spawn("fsdp2", 2, tmp_path)
    # Linear(3, 1)'s weight [1, 3] and bias [1] leave rank 1 with empty shards.
    assert results[1]["local_numels"][-2:] == [0, 0]
    check_rounds(results)


@pytest.mark.slow
def test_hsdp_2x2_mesh_and_a_second_mesh(tmp_path):
    results = spawn("hsdp", 4, tmp_path)
    check_rounds(results)


@pytest.mark.slow
def test_ddp_penalty_after_backward_needs_no_collective(tmp_path):
    results = spawn("ddp", 2, tmp_path)
    value, params, penalty_grads = reference()
    for rank, r in enumerate(results):
        assert r["value"] == pytest.approx(value, rel=1e-5)
        for i, (p, pg) in enumerate(zip(params, penalty_grads)):
            close(r["grads"][i], p.grad + (pg if pg is not None else 0), f"rank {rank} param {i}")
    assert results[0]["grads"] == results[1]["grads"]  # the same update on every rank
