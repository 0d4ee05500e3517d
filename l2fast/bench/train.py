"""`python -m l2fast.bench train`: the seed notebook's training loop vs l2fast's training step.

Both train the same MLP on the same 60,000 images (the bundled sample's 8,000 training digits
tiled to MNIST's size) on the same device, in alternating rounds so that a noisy machine slows
both alike:

  notebook  torchvision.datasets.MNIST + transforms.ToTensor() + DataLoader(batch_size=64,
            shuffle=True), the torch.cat L2 term added to the loss, AdamW, loss.item() per step
            (all as in the notebook);
  l2fast    l2fast.train's step: uint8 data on the device, batches gathered with an on-device
            permutation, the fused penalty after backward, AdamW; no host sync per step.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._cli import CLIError, run
from ..data import DataError, load_dataset
from ..idx import write_idx
from ..model import MLP
from ..train import (ADAMW_IMPLS, DEFAULT_L2_WEIGHT, PENALTIES, CUDAGraphStep, make_optimizer, make_train_step,
                     reference_l2, resolve_device, set_threads, synchronize)

FULL_TRAIN_SIZE = 60_000
RECIPE_STEPS = 5 * 938  # 5 epochs of ceil(60,000 / 64) steps


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m l2fast.bench train", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--steps", type=int, default=200, help="timed steps per side (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps per side first (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds the steps are split in (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader num_workers for the notebook side (default 0; the notebook used 6)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: l2fast.train's, 1 on CPU; 0: torch's)")
    p.add_argument("--penalty", choices=PENALTIES, default="fused", help="l2fast side's penalty (default fused)")
    p.add_argument("--adamw-impl", choices=ADAMW_IMPLS, default="default",
                   help="l2fast side's AdamW implementation (default: the notebook's, as l2fast.train)")
    p.add_argument("--l2-weight", type=float, default=DEFAULT_L2_WEIGHT)
    p.add_argument("--cuda-graphs", action="store_true", help="l2fast side as a replayed CUDA graph")
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.workers < 0:
        p.error("--warmup and --workers must be >= 0")
    return args


def tiled_train_set(size=FULL_TRAIN_SIZE):
    """The sample's training images and labels repeated to `size` examples (uint8, int64)."""
    data = load_dataset("sample")
    reps = -(-size // len(data.train_images))
    images = np.concatenate([data.train_images] * reps)[:size]
    labels = np.concatenate([data.train_labels] * reps)[:size]
    return images, labels, data


def notebook_dataset(images, labels, test, root):
    """torchvision.datasets.MNIST over `images`/`labels`, written to root in its raw layout."""
    from torchvision import datasets, transforms

    raw = Path(root) / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels.astype(np.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", test.test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", test.test_labels.astype(np.uint8))
    return datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor())


class NotebookLoop:
    """The notebook's loop body, one mini-batch per call, batches from an endless DataLoader."""

    def __init__(self, dataset, batch_size, workers, device, l2_weight):
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                                  num_workers=workers)
        self.batches = iter(self.loader)
        self.device, self.l2_weight = device, l2_weight
        self.mlp = MLP().to(device)
        self.loss_function = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.AdamW(self.mlp.parameters(), lr=1e-4)

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch: the DataLoader reshuffles
            self.batches = iter(self.loader)
            return next(self.batches)

    def __call__(self):
        inputs, targets = self.next_batch()
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        self.optimizer.zero_grad()
        outputs = self.mlp(inputs)
        loss = self.loss_function(outputs, targets)
        loss += reference_l2(self.mlp.parameters(), self.l2_weight)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class L2fastLoop:
    """l2fast.train's step over on-device uint8 data, reshuffled on the device every epoch."""

    def __init__(self, images, labels, batch_size, device, penalty, l2_weight, cuda_graphs, adamw_impl):
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        model = MLP().to(device)
        optimizer = make_optimizer(model, lr=1e-4, capturable=cuda_graphs, impl=adamw_impl)
        self.step = make_train_step(model, optimizer, self.images, self.labels, penalty, l2_weight,
                                    keep_grads=cuda_graphs)
        if cuda_graphs:
            self.step = CUDAGraphStep(self.step, batch_size, device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0)
        self.batch_size, self.device, self.i, self.perm = batch_size, device, 0, None
        self.steps_per_epoch = -(-len(self.images) // batch_size)

    def __call__(self):
        if self.perm is None or self.i == self.steps_per_epoch:
            self.perm = torch.randperm(len(self.images), device=self.device, generator=self.generator)
            self.i = 0
        b = self.batch_size
        losses = self.step(self.perm[self.i * b:(self.i + 1) * b])
        self.i += 1
        return losses


def time_steps(loop, steps, device):
    """Milliseconds per step over `steps` calls, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loop()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3 / steps


def main(argv=None):
    """Exit code; usage and data errors print `error: ...` and give 2."""
    return run(_main, argv, user_errors=(DataError,))


def _main(argv):
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise CLIError(f"--cuda-graphs needs a CUDA device (got {device})")
    set_threads(args.threads, device)
    images, labels, sample = tiled_train_set()

    with tempfile.TemporaryDirectory(prefix="l2fast-bench-") as root:
        torch.manual_seed(0)
        notebook = NotebookLoop(notebook_dataset(images, labels, sample, root), args.batch_size,
                                args.workers, device, args.l2_weight)
        torch.manual_seed(0)
        l2fast = L2fastLoop(images, labels, args.batch_size, device, args.penalty, args.l2_weight,
                            args.cuda_graphs, args.adamw_impl)
        loops = {"notebook": notebook, "l2fast": l2fast}
        print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
              f"{len(images):,} images (the bundled sample's 8,000 training digits tiled), batch "
              f"{args.batch_size}; notebook DataLoader num_workers={args.workers} (the notebook used 6); "
              f"l2fast penalty {args.penalty}, AdamW {args.adamw_impl}{', CUDA graph' if args.cuda_graphs else ''}; "
              f"{args.warmup} warmup + {args.steps} timed steps per side in {args.rounds} alternating rounds",
              flush=True)
        for loop in loops.values():
            if args.warmup:
                time_steps(loop, args.warmup, device)
        per_round = [args.steps // args.rounds + (r < args.steps % args.rounds) for r in range(args.rounds)]
        times = {name: [] for name in loops}
        for r, steps in enumerate(per_round):
            if steps == 0:
                continue
            order = list(loops) if r % 2 == 0 else list(loops)[::-1]
            for name in order:
                times[name].append(time_steps(loops[name], steps, device))

    print_table(times)
    return 0


def print_table(times):
    rows = {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}
    print(f"\n{'':10s} {'ms/step (median)':>17s} {'min':>8s} {'max':>8s} {'steps/s':>9s} "
          f"{'5 epochs (4,690 steps)':>23s}")
    for name, (median, low, high) in rows.items():
        print(f"{name:10s} {median:17.3f} {low:8.3f} {high:8.3f} {1e3 / median:9.0f} "
              f"{median * RECIPE_STEPS / 1e3:21.1f} s")
    ratio = rows["notebook"][0] / rows["l2fast"][0]
    print(f"\nl2fast needs {ratio:.1f}x fewer ms per step than the notebook's loop "
          f"(median of {len(times['l2fast'])} rounds; per-round ratios "
          f"{', '.join(f'{a / b:.1f}' for a, b in zip(times['notebook'], times['l2fast']))})")


if __name__ == "__main__":
    sys.exit(main())
