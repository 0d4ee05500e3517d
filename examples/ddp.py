"""DistributedDataParallel with l2fast's penalty, on the bundled MNIST sample.

    torchrun --standalone --nproc_per_node=2 examples/ddp.py [--epochs N]

gloo on CPUs, NCCL with one GPU per rank (the NCCL branch has not yet run on a GPU). DDP averages the data gradients in backward; then every
rank adds the same 2·λ·p to the same (replicated) parameters with no collective, so the replicas
stay identical.
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import l2fast
from l2fast.data import load_dataset
from l2fast.model import MLP

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=1)
epochs = parser.parse_args().epochs

if torch.cuda.is_available():
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
else:
    device = torch.device("cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()

data = load_dataset("sample")                     # every rank reads the same 8,000 digits
images = (torch.from_numpy(data.train_images).float() / 255).to(device)
labels = torch.from_numpy(data.train_labels).to(device)

torch.manual_seed(42)
model = DistributedDataParallel(MLP().to(device))  # starts from rank 0's weights on every rank
groups = l2fast.decay_groups(model, 1e-4)         # from the wrapped model, for the optimizer and the penalty
optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
penalty = l2fast.L2Penalty(groups)

order = torch.Generator().manual_seed(0)          # the same shuffle on every rank
for epoch in range(epochs):
    for batch in torch.randperm(len(images), generator=order).split(64):
        mine = batch[rank::world].to(device)      # this rank's share of the global batch of 64
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images[mine]), labels[mine])
        loss.backward()                           # data gradients all-reduced (averaged) here
        l2 = penalty.add_grad_()                  # local: the same 2·λ·p on every rank
        optimizer.step()

flat = torch.cat([p.detach().flatten() for p in model.parameters()])
rank0 = flat.clone()
dist.broadcast(rank0, src=0)
same = torch.equal(flat, rank0)                   # every replica still holds rank 0's parameters
flags = torch.tensor([int(same)], device=device)
dist.all_reduce(flags, op=dist.ReduceOp.MIN)
if rank == 0:
    with torch.no_grad():
        test = torch.from_numpy(data.test_images).float().to(device) / 255
        accuracy = (model.module(test).argmax(1).cpu().numpy() == data.test_labels).mean()
    print(f"{world} ranks: l2 {l2.item():.4f}, test accuracy {accuracy:.2%}, "
          f"replicas identical: {bool(flags.item())}")
identical = bool(flags.item())
# Nothing may hold the process group past its destruction (DDP's reducer does, through the model):
# gloo aborts the process at exit otherwise ("terminate called without an active exception").
del model, optimizer, penalty, groups
gc.collect()
dist.destroy_process_group()
if not identical:
    raise SystemExit("the replicas differ")
