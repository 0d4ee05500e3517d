"""`python -m l2fast.train`: the seed notebook's MNIST recipe, fast.

The recipe is the notebook's: torch.manual_seed(seed), the 784-64-32-10 ReLU MLP, cross entropy,
AdamW(lr=1e-4) with its default weight_decay=0.01, batches of 64 reshuffled every epoch (the
last partial batch kept), 5 epochs, and an L2 term weight * sum(p^2) over every parameter
(biases included) added to the loss. What changed is how a step runs: the whole dataset sits on
the training device as uint8, each batch is gathered there with a seeded on-device permutation
and scaled by 1/255 (ToTensor's own op), and the penalty's value and gradient come from one
fused kernel (`--penalty fused`) instead of a torch.cat of every parameter. AdamW is built
exactly as the notebook builds it; `--adamw-impl fused` computes the same update in one kernel
(faster; the losses agree to ~1e-7).

The notebook's l2 weight, 1.0, pulls every weight to zero (the loss settles at ln 10 = 2.3026
and accuracy at chance); the default here is DEFAULT_L2_WEIGHT. `--l2-weight 1.0` is the seed.

Outputs in --out: model.pt, metrics.jsonl, summary.json and loss.png.
"""
import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__
from ._cli import CLIError, run
from ._io import atomic_path, atomic_write_text
from .data import DATASETS, DataError, download, load_dataset
from .model import MLP

DEFAULT_L2_WEIGHT = 1e-4
SEED_L2_WEIGHT = 1.0
PENALTIES = ("fused", "autograd", "reference")
ADAMW_IMPLS = ("fused", "foreach", "default")
LOG_LINE = "Loss after mini-batch %5d: %.5f (of which %.5f l2 loss)"  # the notebook's
CUDA_GRAPH_WARMUP_STEPS = 3
NOTEBOOK_LOG_EVERY = 500
SHORT_EPOCH_LOG_EVERY = 25


# ----------------------------------------------------------------------------- command line

def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_float(text):
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m l2fast.train",
        description="Train the seed notebook's MNIST MLP with an L2 penalty over all parameters.")
    p.add_argument("--epochs", type=_positive_int, default=5, help="passes over the training set (default 5)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="mini-batch size (default 64)")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=42, help="torch.manual_seed and the shuffling seed (default 42)")
    p.add_argument("--l2-weight", type=_non_negative_float, default=DEFAULT_L2_WEIGHT,
                   help=f"weight of the L2 term weight*sum(p^2) added to the loss (default "
                        f"{DEFAULT_L2_WEIGHT:g}; the notebook used {SEED_L2_WEIGHT!r}, which drives the "
                        f"weights to zero)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=None,
                   help="AdamW's decoupled weight decay (default: AdamW's own, 0.01, as in the notebook)")
    p.add_argument("--adamw-impl", choices=ADAMW_IMPLS, default="default",
                   help="how AdamW computes its (identical) update: default (torch's choice, exactly the "
                        "notebook's construction), foreach, or fused (one kernel; faster, losses agree to ~1e-7)")
    p.add_argument("--penalty", choices=PENALTIES, default="fused",
                   help="fused: l2fast.l2_penalty_ after backward (default); autograd: l2fast.l2_penalty "
                        "in the loss; reference: the notebook's torch.cat formula")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default on CPU: 1, as the MLP's ops are too small to gain "
                        "from more and extra threads spin against each other; 0: torch's default)")
    p.add_argument("--dataset", choices=DATASETS, default="auto",
                   help="auto: full MNIST from --data-dir if there, else the bundled sample (default)")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="root of torchvision's layout: <data-dir>/MNIST/raw/... (default ./data)")
    p.add_argument("--download", action="store_true", help="fetch the full dataset into --data-dir first")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: a new runs/<timestamp>)")
    p.add_argument("--metrics", type=Path, default=None, help="JSON Lines metrics (default <out>/metrics.jsonl)")
    p.add_argument("--log-every", type=_positive_int, default=None,
                   help=f"print and record the loss every N mini-batches (default {NOTEBOOK_LOG_EVERY}, as the "
                        f"notebook; {SHORT_EPOCH_LOG_EVERY} when an epoch is shorter, e.g. the sample's 125 steps)")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop after this many steps in all (the last epoch is then partial)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: capture the whole train step in a CUDA graph and replay it")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the step's forward and loss (its backward is compiled with it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)")
    return p.parse_args(argv)


def resolve_device(name):
    """torch.device for --device; CLIError when it names a device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name}: not a device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                           f"torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise CLIError(f"--device {name}: unsupported (expected auto, cpu, cuda or cuda:N)")
    return device


def set_threads(threads, device):
    """torch.set_num_threads: `threads`, or 1 on CPU when None; 0 leaves torch's default."""
    if threads is None:
        threads = 1 if device.type == "cpu" else 0
    if threads > 0:
        torch.set_num_threads(threads)


def check_options(args, device):
    if args.threads is not None and args.threads < 0:
        raise CLIError(f"--threads {args.threads}: expected 0 (torch's default) or a positive count")
    if args.cuda_graphs and device.type != "cuda":
        raise CLIError(f"--cuda-graphs needs a CUDA device (got --device {args.device} -> {device})")
    if args.cuda_graphs and args.compile:
        raise CLIError("--cuda-graphs and --compile are alternatives: choose one")


# ----------------------------------------------------------------------------- building blocks

def reference_l2(params, weight):
    """The notebook's L2 term: weight * sum of squares of all parameters, via torch.cat."""
    return weight * torch.square(torch.cat([p.view(-1) for p in params])).sum()


def _l2fast_ops():
    """The compiled op API; a CLIError with a hint when the extension cannot be loaded."""
    try:
        from . import functional as ops
        ops.l2_penalty_  # noqa: B018  (loads the extension where that is lazy)
        return ops
    except Exception as e:  # noqa: BLE001  (ImportError, OSError from dlopen, RuntimeError)
        raise CLIError(f"the l2fast extension could not be loaded ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:300]}); build it or use --penalty reference") from None


def penalty_term(mode):
    """For autograd/reference: params, weight -> differentiable L2 term. None for fused."""
    if mode == "fused":
        return None
    if mode == "autograd":
        return _l2fast_ops().l2_penalty
    return reference_l2


def fused_penalty():
    """params, weight -> penalty value, adding 2 * weight * p to each p.grad in place."""
    return _l2fast_ops().l2_penalty_


def make_optimizer(model, lr, weight_decay=None, capturable=False, impl="default"):
    """AdamW(lr) as the notebook builds it; weight_decay=None keeps AdamW's default (0.01).

    impl picks only how the same update is computed: "default" is torch's own choice (a loop
    over the parameters on CPU, as the notebook ran), "foreach" or "fused" (one kernel per step).
    """
    kwargs = {} if weight_decay is None else {"weight_decay": weight_decay}
    if capturable:
        kwargs["capturable"] = True
    if impl != "default":
        kwargs[impl] = True
    return torch.optim.AdamW(model.parameters(), lr=lr, **kwargs)


def to_device(data, device):
    """The dataset on the device, once: images as uint8 [N, 28, 28], labels as int64 [N]."""
    return tuple(torch.from_numpy(a).to(device) for a in
                 (data.train_images, data.train_labels, data.test_images, data.test_labels))


def scale_images(images_u8):
    """uint8 pixels -> float32 in [0, 1], ToTensor's own operation (img.float().div(255))."""
    return images_u8.float().div(255)


def make_train_step(model, optimizer, images, labels, penalty="fused", l2_weight=DEFAULT_L2_WEIGHT,
                    compile=False, keep_grads=False):
    """step(idx) trains on images[idx], labels[idx] (on-device tensors) and returns a detached
    float32 tensor [loss, data_loss, l2_loss] without synchronizing with the host.

    keep_grads: zero the grads in place instead of dropping them (what a CUDA graph needs: its
    kernels write to fixed addresses); otherwise backward hands its fresh grads over, no copy."""
    params = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    l2_term = penalty_term(penalty)
    add_l2_grad = fused_penalty() if l2_term is None else None

    def forward(idx):
        x = scale_images(images.index_select(0, idx))
        y = labels.index_select(0, idx)
        data_loss = loss_fn(model(x), y)
        l2 = None if l2_term is None else l2_term(params, l2_weight)
        return data_loss, l2

    if compile:
        forward = torch.compile(forward)

    def step(idx):
        optimizer.zero_grad(set_to_none=not keep_grads)
        data_loss, l2 = forward(idx)
        if l2 is None:  # fused: data-loss gradient first, then grad += 2 * w * p and the value
            data_loss.backward()
            l2 = add_l2_grad(params, l2_weight)
            loss = data_loss.detach() + l2
        else:
            loss = data_loss + l2
            loss.backward()
        optimizer.step()
        return torch.stack([loss.detach(), data_loss.detach(), l2.detach().to(loss.dtype)])

    return step


class CUDAGraphStep:
    """Runs `step` as a replayed CUDA graph: a few eager warmup steps on a side stream, then one
    capture of the whole step (forward, backward, penalty, AdamW(capturable=True)) reading the
    batch indices from a static buffer. A batch of another size (the last partial one) runs
    eagerly; its gradients accumulate in place into the same grad tensors, so the graph stays valid.
    """

    def __init__(self, step, batch_size, device, warmup_steps=CUDA_GRAPH_WARMUP_STEPS):
        self.step, self.batch_size, self.warmup_steps = step, batch_size, warmup_steps
        self.static_idx = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.graph, self.static_out, self.eager_steps, self.side_stream = None, None, 0, None

    def __call__(self, idx):
        if len(idx) != self.batch_size:
            return self.step(idx)
        if self.graph is None:
            if self.eager_steps < self.warmup_steps:
                self.eager_steps += 1
                return self._side_stream_step(idx)
            self._capture()
        self.static_idx.copy_(idx)
        self.graph.replay()
        return self.static_out

    def _side_stream_step(self, idx):
        """An eager step on a side stream, as capture wants: lazy initialisation (optimizer state,
        library handles, grads) happens outside the graph and off the capture's stream."""
        self.side_stream = self.side_stream or torch.cuda.Stream()
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            out = self.step(idx)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return out

    def _capture(self):
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records only: the step runs at the first replay
            self.static_out = self.step(self.static_idx)


@torch.no_grad()
def evaluate(model, images, labels, chunk=4096):
    """(mean cross-entropy, accuracy) on images/labels, as Python floats; synchronizes."""
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, len(images), chunk):
        logits = model(scale_images(images[start:start + chunk]))
        y = labels[start:start + chunk]
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    return total_loss.item() / len(images), correct.item() / len(images)


def param_sq_norm(model):
    """sum of p^2 over all parameters, as a Python float."""
    with torch.no_grad():
        return sum(float(p.double().square().sum()) for p in model.parameters())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- outputs

def default_out_dir():
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / stamp
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{stamp}-{n}"
    return out


def plain_config(args):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def versions():
    import numpy

    return {"l2fast": __version__, "torch": str(torch.__version__), "numpy": numpy.__version__,
            "python": platform.python_version()}


def device_name(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"


def write_metrics(path, records):
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_checkpoint(path, model, args, data):
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.config(),
        "train_config": plain_config(args),
        "dataset": {"name": data.name, "data_dir": str(args.data_dir)},
        "versions": versions(),
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def plot_losses(path, history):
    """Data loss and L2 loss per global step, log y scale."""
    from matplotlib.figure import Figure

    steps = range(1, len(history) + 1)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for column, label in ((1, "data loss (cross entropy)"), (2, "L2 loss (weight * sum p^2)")):
        values = [row[column] if row[column] > 0 else float("nan") for row in history]
        ax.plot(steps, values, label=label, linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


# ----------------------------------------------------------------------------- training

def load_data(args):
    if args.download:
        if args.dataset == "sample":
            raise CLIError("--download fetches the full dataset; --dataset sample is bundled already")
        print(f"downloading into {args.data_dir} ...", flush=True)
        download(args.dataset, args.data_dir)
    return load_dataset(args.dataset, args.data_dir)


def progress_bar(total, enabled):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, leave=False, unit="step")


def run_epoch(step, perm, n_steps, batch_size, epoch, log_every, history, first_step, show_progress):
    """n_steps steps over the batches of `perm`; each step's losses go to history[first_step + i].
    Prints the notebook's line every log_every steps; returns (seconds, metrics records)."""
    device = perm.device
    bar = progress_bar(n_steps, show_progress)
    records = []
    synchronize(device)
    start = time.perf_counter()
    for i in range(n_steps):
        losses = step(perm[i * batch_size:(i + 1) * batch_size])
        history[first_step + i].copy_(losses)
        if (i + 1) % log_every == 0:
            loss, data_loss, l2_loss = losses.tolist()  # the only host sync inside the epoch
            message = LOG_LINE % (i + 1, loss, l2_loss)
            if bar is None:
                print(message, flush=True)
            else:
                bar.write(message)
            records.append({"epoch": epoch, "step": i + 1, "loss": loss, "data_loss": data_loss,
                            "l2_loss": l2_loss})
        if bar is not None:
            bar.update()
    synchronize(device)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return seconds, records


def train(args):
    """The whole run: data, model, the epochs, and the files in --out. Returns the summary dict."""
    wall_start = time.perf_counter()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the streams and the graph below use the current device
    check_options(args, device)
    set_threads(args.threads, device)
    data = load_data(args)
    print(f"dataset: {data.name} ({data.source})", flush=True)
    out = args.out = args.out or default_out_dir()
    metrics_path = args.metrics = args.metrics or out / "metrics.jsonl"

    torch.manual_seed(args.seed)
    model = MLP().to(device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.cuda_graphs, args.adamw_impl)
    train_x, train_y, test_x, test_y = to_device(data, device)
    step = make_train_step(model, optimizer, train_x, train_y, args.penalty, args.l2_weight, args.compile,
                           keep_grads=args.cuda_graphs)
    if args.cuda_graphs:
        step = CUDAGraphStep(step, args.batch_size, device)
    shuffle = torch.Generator(device=device)
    shuffle.manual_seed(args.seed)

    n_train, batch = len(train_x), args.batch_size
    steps_per_epoch = math.ceil(n_train / batch)
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    if args.log_every is None:  # the notebook's 500, unless an epoch would then print no line at all
        args.log_every = NOTEBOOK_LOG_EVERY if steps_per_epoch >= NOTEBOOK_LOG_EVERY else SHORT_EPOCH_LOG_EVERY
    print(f"device: {device_name(device)}; penalty: {args.penalty}, l2 weight {args.l2_weight:g}; "
          f"AdamW ({args.adamw_impl}) lr {args.lr:g}, weight decay {optimizer.param_groups[0]['weight_decay']:g}; "
          f"batch {batch}, {steps_per_epoch} steps/epoch, {total_steps} steps, logged every {args.log_every}; "
          f"output: {out}", flush=True)

    history = torch.zeros(total_steps, 3, device=device)  # every step's losses, read at the end
    records, done, train_seconds = [], 0, 0.0
    for epoch in range(1, math.ceil(total_steps / steps_per_epoch) + 1):
        print(f"Starting epoch {epoch}", flush=True)
        perm = torch.randperm(n_train, device=device, generator=shuffle)
        n_steps = min(steps_per_epoch, total_steps - done)
        seconds, logged = run_epoch(step, perm, n_steps, batch, epoch, args.log_every, history, done,
                                    not args.no_progress)
        done, train_seconds = done + n_steps, train_seconds + seconds
        test_loss, test_accuracy = evaluate(model, test_x, test_y)
        samples_per_second = min(n_steps * batch, n_train) / seconds
        print(f"Epoch {epoch}: test loss {test_loss:.5f}, test accuracy {100 * test_accuracy:.2f}% "
              f"({len(test_x):,} images); {seconds:.2f} s, {samples_per_second:,.0f} samples/s", flush=True)
        records += logged + [{"epoch": epoch, "test_loss": test_loss, "test_accuracy": test_accuracy,
                              "epoch_seconds": seconds, "samples_per_second": samples_per_second}]
        write_metrics(metrics_path, records)
    print("Training process has finished.", flush=True)

    history = history.tolist()
    summary = summarize(args, data, device, optimizer, model, history, records, wall_start)
    write_checkpoint(out / "model.pt", model, args, data)
    plot_losses(out / "loss.png", history)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"test accuracy {100 * test_accuracy:.2f}%, test loss {test_loss:.5f}; {done} steps in "
          f"{train_seconds:.1f} s ({summary['steps_per_second']:.0f} steps/s); wrote {out}", flush=True)
    return summary


def summarize(args, data, device, optimizer, model, history, records, wall_start):
    """summary.json's content: final metrics, timings, and the settings that produced them."""
    epochs = [r for r in records if "test_accuracy" in r]
    last_epoch, train_seconds = epochs[-1], sum(r["epoch_seconds"] for r in epochs)
    return {
        "test_accuracy": last_epoch["test_accuracy"], "test_loss": last_epoch["test_loss"],
        "final_loss": history[-1][0], "final_data_loss": history[-1][1], "final_l2_loss": history[-1][2],
        "param_sq_norm": param_sq_norm(model),
        "epochs": len(epochs), "steps": len(history), "train_seconds": train_seconds,
        "steps_per_second": len(history) / train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "device": device_name(device), "penalty": args.penalty, "l2_weight": args.l2_weight,
        "weight_decay": optimizer.param_groups[0]["weight_decay"], "lr": args.lr, "adamw_impl": args.adamw_impl,
        "batch_size": args.batch_size, "seed": args.seed, "cuda_graphs": args.cuda_graphs, "compile": args.compile,
        "dataset": {"name": data.name, "data_dir": str(args.data_dir), "source": data.source,
                    "train_size": len(data.train_labels), "test_size": len(data.test_labels)},
        "versions": versions(),
    }


def main(argv=None):
    args = parse_args(argv)
    train(args)
    return 0


def cli(argv=None):
    """main() as a command: usage and data errors print `error: ...` and return 2, no traceback."""
    return run(main, argv, user_errors=(DataError,))


if __name__ == "__main__":
    sys.exit(cli())
