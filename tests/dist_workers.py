"""Worker processes for tests/test_distributed.py (gloo on CPU, spawned, results as plain lists).

Each scenario builds the same seeded model on every rank, shards it (FSDP2, HSDP, or wraps it in
DDP), runs the penalty, and reports values and full gradients as plain Python lists, so that the
parent compares them with an unsharded float64 reference it computes itself.
"""
import datetime
import traceback

import torch
import torch.distributed as dist
from torch import nn

WEIGHT = 0.05


def uneven_mlp():
    """Shapes that do not divide by 2 or 4: some ranks get short shards, some get empty ones."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3), nn.ReLU(), nn.Linear(3, 1))


def batch(rank=None, world=1):
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    if rank is None:
        return x, y
    return x.chunk(world)[rank], y.chunk(world)[rank]


def full(t):
    """A DTensor's (or plain tensor's) whole value as nested lists of float64."""
    if t is None:
        return None
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().double().tolist()


def grads_of(model):
    return [full(p.grad) for p in model.parameters()]


def run(scenario, rank, world, init_file, queue):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.set_num_threads(1)
        try:
            queue.put((rank, "ok", SCENARIOS[scenario](rank, world)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which fails the test with it
        queue.put((rank, "error", traceback.format_exc()))


def _penalty_rounds(model, local_batch):
    """value, add_grad_ onto FSDP's grads, add_grad_ onto fresh grads, the differentiable term."""
    import l2fast

    groups = l2fast.decay_groups(model, WEIGHT)
    pen = l2fast.L2Penalty(groups)
    out = {"value": pen.value().item(), "value_type": type(pen.value()).__name__}
    x, y = local_batch
    nn.functional.mse_loss(model(x), y).backward()
    out["data_grads"] = grads_of(model)
    out["add_grad_value"] = pen.add_grad_().item()
    out["grads_after"] = grads_of(model)
    for p in model.parameters():
        p.grad = None
    out["fresh_value"] = pen.add_grad_().item()
    out["fresh_grads"] = grads_of(model)
    out["functional_value"] = l2fast.l2_penalty_(groups, None).item()  # accumulates onto the fresh grads
    out["functional_grads"] = grads_of(model)
    for p in model.parameters():
        p.grad = None
    term = pen()
    term.backward()
    out["term_value"] = term.item()
    out["term_grads"] = grads_of(model)
    out["local_numels"] = [p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()]
    return out


def fsdp2_model():
    from torch.distributed.fsdp import fully_shard

    model = uneven_mlp()
    for layer in (model[0], model[3]):
        fully_shard(layer)
    fully_shard(model)
    return model


def hsdp_model():
    """A 2x2 mesh (replicate, shard) for the first layer, a flat 4-way mesh for the last: two meshes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    flat = init_device_mesh("cpu", (4,))
    model = uneven_mlp()
    fully_shard(model[0], mesh=mesh2d)
    fully_shard(model[1], mesh=mesh2d)
    fully_shard(model[3], mesh=flat)
    fully_shard(model, mesh=mesh2d)
    return model


def fsdp2(rank, world):
    return _penalty_rounds(fsdp2_model(), batch(rank, world))


def hsdp(rank, world):
    return _penalty_rounds(hsdp_model(), batch(rank, world))


def ddp(rank, world):
    """The rule: after backward (grads averaged over ranks), the same add_grad_ on every rank."""
    import l2fast
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(uneven_mlp())
    pen = l2fast.L2Penalty(l2fast.decay_groups(model, WEIGHT))
    x, y = batch(rank, world)
    nn.functional.mse_loss(model(x), y).backward()
    value = pen.add_grad_().item()
    return {"value": value, "grads": grads_of(model)}


# ----------------------------------------------------------------------------- l2fast.optim.AdamW (tests/test_optim.py)

OPTIM_STEPS = 3


def optim_rounds(model, local_batch):
    """OPTIM_STEPS steps of l2fast.optim.AdamW over decay groups: each step's penalty, then the full
    params and first moments."""
    import l2fast
    from l2fast.optim import AdamW

    opt = AdamW(l2fast.decay_groups(model, WEIGHT), lr=1e-2, weight_decay=0.1)
    x, y = local_batch
    values = []
    for _ in range(OPTIM_STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        values.append(opt.penalty.item())
    return {"values": values, "value_type": type(opt.penalty).__name__,
            "params": [full(p) for p in model.parameters()],
            "exp_avgs": [full(opt.state[p]["exp_avg"]) for p in model.parameters()],
            "state_types": sorted({type(opt.state[p]["exp_avg"]).__name__ for p in model.parameters()})}


def optim_fsdp2(rank, world):
    return optim_rounds(fsdp2_model(), batch(rank, world))


def optim_hsdp(rank, world):
    return optim_rounds(hsdp_model(), batch(rank, world))


def optim_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    return optim_rounds(DistributedDataParallel(uneven_mlp()), batch(rank, world))


SCENARIOS = {"fsdp2": fsdp2, "hsdp": hsdp, "ddp": ddp, "optim_fsdp2": optim_fsdp2, "optim_hsdp": optim_hsdp,
             "optim_ddp": optim_ddp}
