"""`python -m l2fast.bench train`: the seed notebook's training loop vs l2fast's training step.

Both train the same MLP on the same 60,000 images (the bundled sample's 8,000 training digits
tiled to MNIST's size) on the same device, in alternating rounds so that a noisy machine slows
both alike:

  notebook  torchvision.datasets.MNIST + transforms.ToTensor() + DataLoader(batch_size=64,
            shuffle=True), the torch.cat L2 term added to the loss, AdamW, loss.item() per step
            (all as in the notebook);
  l2fast    l2fast.engine's step as l2fast.train runs it: uint8 data on the device, batches gathered with an on-device
            permutation, the penalty inside the AdamW step (l2fast.optim.AdamW, l2fast.train's default;
            --penalty fused: an l2fast.L2Penalty after backward and torch's fused AdamW, --adamw-impl
            default for the notebook's AdamW); no host sync per step.
"""
import json
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np

from .. import _cli
from .._io import atomic_write_text
from ..data import load_dataset
from ..errors import UsageError
from ..idx import write_idx
from ..choices import ADAMW_IMPLS, PENALTIES
from ..train import DEFAULT_L2_WEIGHT, MAX_BATCH_SIZE

# imported on first use: `--help` and option errors cost no torch import
torch, engine, model, timing = map(_cli.LazyModule, ("torch", "l2fast.engine", "l2fast.model", "l2fast.bench.timing"))

FULL_TRAIN_SIZE = 60_000
RECIPE_STEPS = 5 * 938  # 5 epochs of ceil(60,000 / 64) steps


def add_arguments(p):
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--steps", type=int, default=200, help="timed steps per side (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps per side first (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds the steps are split in (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader num_workers for the notebook side (default 0; the notebook used 6)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: l2fast.train's, 1 on CPU; 0: torch's)")
    p.add_argument("--penalty", choices=PENALTIES, default="optimizer",
                   help="l2fast side's penalty (default optimizer, as l2fast.train)")
    p.add_argument("--adamw-impl", choices=ADAMW_IMPLS, default="fused",
                   help="l2fast side's torch AdamW implementation with --penalty fused, autograd or reference "
                        "(default: fused, as l2fast.train; 'default' is the notebook's construction)")
    p.add_argument("--l2-weight", type=float, default=DEFAULT_L2_WEIGHT)
    p.add_argument("--cuda-graphs", action="store_true", help="l2fast side as a replayed CUDA graph")
    p.add_argument("--json", default=None, help="also write the measurements to this JSON file")


def check_args(args):
    """UsageError naming the option for a value the benchmark cannot use."""
    for name in ("steps", "rounds", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if args.batch_size > MAX_BATCH_SIZE:
        raise UsageError(f"--batch-size {args.batch_size}: expected at most {MAX_BATCH_SIZE}")
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: expected 0 or more")
    if not 0 <= args.workers <= engine.max_threads():
        raise UsageError(f"--workers {args.workers}: expected 0 to {engine.max_threads()} (the CPUs this process may use)")
    if not (math.isfinite(args.l2_weight) and args.l2_weight >= 0):
        raise UsageError(f"--l2-weight {args.l2_weight}: expected a finite number >= 0")
    engine.check_threads(args.threads)
    engine.adamw_impl_for(args.penalty, args.adamw_impl)


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
        self.calls, self.last_loss = 0, None
        self.mlp = model.MLP().to(device)
        self.loss_function = torch.nn.CrossEntropyLoss()
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
        loss += engine.reference_l2(self.mlp.parameters(), self.l2_weight)
        loss.backward()
        self.optimizer.step()
        self.calls, self.last_loss = self.calls + 1, loss.item()
        return self.last_loss


class L2fastLoop:
    """l2fast.engine's step (as l2fast.train runs it) over on-device uint8 data, reshuffled on the device every epoch."""

    def __init__(self, images, labels, batch_size, device, penalty, l2_weight, cuda_graphs, adamw_impl):
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(labels).to(device)
        mlp = model.MLP().to(device)
        optimizer, strategy = engine.optimizer_and_penalty(mlp, penalty, l2_weight, lr=1e-4, capturable=cuda_graphs,
                                                           impl=adamw_impl)
        self.step = engine.build_step(mlp, optimizer, self.images, self.labels, strategy, batch_size, device,
                                      cuda_graphs=cuda_graphs)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0)
        self.batch_size, self.device, self.i, self.perm = batch_size, device, 0, None
        self.calls, self.last = 0, None
        self.steps_per_epoch = -(-len(self.images) // batch_size)

    def __call__(self):
        if self.perm is None or self.i == self.steps_per_epoch:
            self.perm = torch.randperm(len(self.images), device=self.device, generator=self.generator)
            self.i = 0
        b = self.batch_size
        losses = self.step(self.perm[self.i * b:(self.i + 1) * b])
        self.i += 1
        self.calls, self.last = self.calls + 1, losses
        return losses

    @property
    def last_loss(self):
        return None if self.last is None else float(self.last[0])


def run(args):
    """Exit code; a bad option raises UsageError (exit 2)."""
    check_args(args)
    device = engine.resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device (got {device})")
    engine.set_threads(args.threads, device)
    engine.check_penalty(args.penalty)  # the extension loads, or a one-line error
    images, labels, sample = tiled_train_set()

    # SIGTERM unwinds like Ctrl-C, so the temporary folder (47 MB of IDX files) goes either way
    with _cli.sigterm_raises(), tempfile.TemporaryDirectory(prefix="l2fast-bench-") as root:
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
              f"l2fast penalty {args.penalty}, AdamW {engine.adamw_impl_for(args.penalty, args.adamw_impl)}"
              f"{', CUDA graph' if args.cuda_graphs else ''}; "
              f"{args.warmup} warmup + {args.steps} timed steps per side in {args.rounds} alternating rounds",
              flush=True)
        for loop in loops.values():
            if args.warmup:
                timing.time_call(loop, iters=args.warmup)
        seconds = timing.interleaved(loops, args.steps, args.rounds)
    times = {name: [s * 1e3 for s in per_round] for name, per_round in seconds.items()}
    print_table(times)
    if args.json:
        atomic_write_text(args.json, json.dumps(results(times, loops), indent=2) + "\n")
    return 0


def results(times, loops):
    """The measurements as JSON: per side, ms per step in each round, their median, the steps run
    and the last step's loss (finite when the side really trained)."""
    rows = {name: {"ms_per_step_rounds": t, "ms_per_step_median": statistics.median(t),
                   "steps_run": loops[name].calls, "last_loss": loops[name].last_loss} for name, t in times.items()}
    return {"results": rows, "speedup": rows["notebook"]["ms_per_step_median"] / rows["l2fast"]["ms_per_step_median"]}


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

