"""FSDP2 (`fully_shard`) with l2fast's penalty, on the bundled MNIST sample.

    torchrun --standalone --nproc_per_node=2 examples/fsdp.py [--epochs N]

gloo on CPUs, NCCL with one GPU per rank (the NCCL branch has not yet run on a GPU). Each rank runs the fused kernel on its own shards; the
penalty's value is the global one (one all-reduce), the same on every rank.
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

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
model = MLP().to(device)
for layer in model.layers:
    if isinstance(layer, nn.Linear):
        fully_shard(layer)
fully_shard(model)                                # from here on the parameters are sharded DTensors
groups = l2fast.decay_groups(model, 1e-4)         # after fully_shard, for the optimizer and the penalty
optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
penalty = l2fast.L2Penalty(groups)

order = torch.Generator().manual_seed(0)          # the same shuffle on every rank
for epoch in range(epochs):
    for batch in torch.randperm(len(images), generator=order).split(64):
        mine = batch[rank::world].to(device)      # this rank's share of the global batch of 64
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images[mine]), labels[mine])
        loss.backward()                           # gradients reduce-scattered to the shards here
        l2 = penalty.add_grad_()                  # fused over the local shards; the global value
        optimizer.step()

values = [torch.zeros_like(l2) for _ in range(world)]
dist.all_gather(values, l2)                       # the penalty's value as each rank got it
with torch.no_grad():                             # every rank takes part in the sharded forward
    test = torch.from_numpy(data.test_images).float().to(device) / 255
    predicted = model(test).argmax(1).cpu().numpy()
if rank == 0:
    accuracy = (predicted == data.test_labels).mean()
    print(f"{world} ranks: l2 {', '.join(f'{v.item():.6f}' for v in values)} (one per rank), "
          f"test accuracy {accuracy:.2%}")
agree = all(torch.equal(v, values[0]) for v in values)
# Nothing may hold the process group past its destruction (FSDP2's device mesh does, through the model):
# gloo aborts the process at exit otherwise ("terminate called without an active exception").
del model, optimizer, penalty, groups
gc.collect()
dist.destroy_process_group()
if not agree:
    raise SystemExit("the ranks disagree on the penalty's value")
