"""`python -m l2fast.train`: the seed notebook's MNIST recipe, fast.

The recipe is the notebook's: torch.manual_seed(seed), the 784-64-32-10 ReLU MLP, cross entropy,
AdamW(lr=1e-4) with its default weight_decay=0.01, batches of 64 reshuffled every epoch (the
last partial batch kept), 5 epochs, and an L2 term weight * sum(p^2) over every parameter
(biases included) added to the loss. What changed is how a step runs: the whole dataset sits on
the training device as uint8, each batch is gathered there with a seeded permutation (drawn on
the CPU, so that every device shuffles alike) and scaled by 1/255 (ToTensor's own op), and the penalty's value and gradient come from
the AdamW step itself (`--penalty optimizer`, the default: l2fast.optim.AdamW forms g + 2·w·p in
registers and sums the value in the same pass over memory) instead of a torch.cat of every
parameter. `--penalty fused` applies an l2fast.L2Penalty after backward and steps with torch's
AdamW: its fused implementation by default (`--adamw-impl fused`: the same update in one kernel,
the losses agree to float rounding); `--adamw-impl default` keeps the notebook's exact construction.

`torchrun --standalone --nproc_per_node=N -m l2fast.train --parallel ddp|fsdp` trains the same
run data-parallel (gloo on CPU, NCCL on CUDA; see l2fast.parallel): the global batch is still
--batch-size, split over the ranks, and rank 0 alone prints and writes the run folder.

The notebook's l2 weight, 1.0, pulls every weight to zero (the loss settles at ln 10 = 2.3026
and accuracy at chance); the default here is DEFAULT_L2_WEIGHT. `--l2-weight 1.0` is the seed.

Outputs in --out (a new or empty folder; --overwrite to reuse one): model.pt, metrics.jsonl,
summary.json and loss.png. summary.json's "status" is "running" while training (updated every
epoch), then "completed", "interrupted" (Ctrl-C or SIGTERM; no model.pt), "diverged" (a non-finite
loss; no model.pt) or "failed" (with the "reason": an output that could not be written, a torchrun
rank that died). What can be checked is checked before training: the output paths, and the free space.
This module is the CLI, the epoch loop and the run outputs; `train(TrainConfig(...))` is the same
run called from Python. The step itself is l2fast.engine's.
"""
import contextlib
import dataclasses
import io
import math
import os
import sys
import time
from pathlib import Path

from . import _cli
from .choices import ADAMW_IMPLS, PARALLEL_KINDS, PENALTIES
from .runs import (RUN_FILES, MetricsWriter, failure_reason, plot_losses, prepare_outputs, recorded,  # noqa: F401
                   write_summary)
from .data import DATASETS, download, load_dataset
from .errors import DivergedError, L2fastError, UsageError

# Imported on first use: parsing the command line (and --help) imports no torch.
torch, checkpoint, engine, parallel = map(_cli.LazyModule, ("torch", "l2fast.checkpoint", "l2fast.engine",
                                                             "l2fast.parallel"))

DEFAULT_L2_WEIGHT = 1e-4
SEED_L2_WEIGHT = 1.0
LOG_LINE = "Loss after mini-batch %5d: %.5f (of which %.5f l2 loss)"  # the notebook's
NOTEBOOK_LOG_EVERY = 500
SHORT_EPOCH_LOG_EVERY = 25
MAX_TOTAL_STEPS = 10_000_000  # every step's losses stay in memory for loss.png: 12 bytes a step
MAX_LR = 1e30  # AdamW's float32 step (lr / bias correction) must stay finite
MAX_BATCH_SIZE = 2 ** 31 - 1
OUTPUT_MARGIN = 1 << 20  # bytes free for metrics.jsonl, summary.json and loss.png, besides the checkpoint


@dataclasses.dataclass
class TrainConfig:
    """One training run, as plain values; the CLI's options, with the same names and defaults."""
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-4
    seed: int = 42
    l2_weight: float = DEFAULT_L2_WEIGHT
    weight_decay: float | None = None  # None: AdamW's own default, 0.01
    adamw_impl: str = "fused"
    penalty: str = "optimizer"
    device: str = "auto"
    threads: int | None = None  # None: 1 on CPU; 0: torch's default
    dataset: str = "auto"
    data_dir: str = "data"
    download: bool = False
    out: str | None = None  # None: a new runs/<timestamp>
    metrics: str | None = None  # None: <out>/metrics.jsonl
    log_every: int | None = None  # None: 500, or 25 when an epoch is shorter
    max_steps: int | None = None
    cuda_graphs: bool = False
    compile: bool = False
    no_progress: bool = False
    overwrite: bool = False
    parallel: str | None = None  # "ddp" or "fsdp", under torchrun

    def check(self):
        """UsageError naming the option when a value is outside what a run can use."""
        for name in ("epochs", "batch_size", "log_every", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{_opt(name)} {value}: expected a positive integer")
        if self.batch_size > MAX_BATCH_SIZE:
            raise UsageError(f"--batch-size {self.batch_size}: expected at most {MAX_BATCH_SIZE}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise UsageError(f"--lr {self.lr:g}: expected a number > 0 and at most {MAX_LR:g} "
                             f"(AdamW's float32 update must stay finite)")
        for name in ("l2_weight", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"--{_opt(name)} {value:g}: expected a finite number >= 0")
        engine.check_seed(self.seed)
        engine.check_threads(self.threads)
        for name, allowed in (("penalty", PENALTIES), ("adamw_impl", ADAMW_IMPLS), ("dataset", DATASETS)):
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{_opt(name)} {getattr(self, name)}: expected one of {', '.join(allowed)}")
        engine.adamw_impl_for(self.penalty, self.adamw_impl)
        if self.download and self.dataset == "sample":
            raise UsageError("--download fetches the full dataset; --dataset sample is bundled already")
        if self.cuda_graphs and self.compile:
            raise UsageError("--cuda-graphs and --compile are alternatives: choose one")
        if self.parallel is not None:
            if self.parallel not in PARALLEL_KINDS:
                raise UsageError(f"--parallel {self.parallel}: expected one of {', '.join(PARALLEL_KINDS)}")
            for name in ("cuda_graphs", "compile"):
                if getattr(self, name):
                    raise UsageError(f"--{_opt(name)} is not supported with --parallel; drop one of them")
            if self.parallel == "fsdp" and self.penalty == "reference":
                raise UsageError("--penalty reference with --parallel fsdp: the notebook's torch.cat formula over "
                                 "FSDP2's sharded parameters yields gradients FSDP2 cannot accumulate; use "
                                 "--penalty optimizer (the default), fused or autograd")

    def plain(self):
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _opt(name):
    return name.replace("_", "-")


# ----------------------------------------------------------------------------- command line

def build_parser():
    d = TrainConfig()
    p = _cli.ArgumentParser(
        prog=_cli.prog("l2fast.train", "l2fast-train"),
        description="Train the seed notebook's MNIST MLP with an L2 penalty over all parameters.")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set (default 5)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="mini-batch size (default 64)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=d.seed, help="torch.manual_seed and the shuffling seed (default 42)")
    p.add_argument("--l2-weight", type=float, default=d.l2_weight,
                   help=f"weight of the L2 term weight*sum(p^2) added to the loss (default "
                        f"{DEFAULT_L2_WEIGHT:g}; the notebook used {SEED_L2_WEIGHT!r}, which drives the "
                        f"weights to zero)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW's decoupled weight decay (default: AdamW's own, 0.01, as in the notebook)")
    p.add_argument("--adamw-impl", choices=ADAMW_IMPLS, default=d.adamw_impl,
                   help="with --penalty fused, autograd or reference: how torch's AdamW computes its (identical) "
                        "update: fused (one kernel; the default), foreach, or default (torch's own choice: exactly "
                        "the notebook's construction; the losses agree with fused to float rounding)")
    p.add_argument("--penalty", choices=PENALTIES, default=d.penalty,
                   help="optimizer: inside the AdamW step, l2fast.optim.AdamW (default); fused: an l2fast.L2Penalty "
                        "over every parameter, applied after backward; autograd: l2fast.l2_penalty in the loss; "
                        "reference: the notebook's torch.cat formula")
    p.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU intra-op threads (default on CPU: 1, as the MLP's ops are too small to gain "
                        "from more and extra threads spin against each other; 0: torch's default)")
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset,
                   help="auto: full MNIST from --data-dir if there, else the bundled sample (default)")
    p.add_argument("--data-dir", default=d.data_dir,
                   help="root of torchvision's layout: <data-dir>/MNIST/raw/... (default ./data)")
    p.add_argument("--download", action="store_true", help="fetch the full dataset into --data-dir first")
    p.add_argument("--out", default=d.out,
                   help="run folder, new or empty (default: a new runs/<timestamp>)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out (replacing its model.pt, metrics.jsonl, summary.json, "
                        "loss.png) or over an existing --metrics file")
    p.add_argument("--metrics", default=d.metrics, help="JSON Lines metrics (default <out>/metrics.jsonl)")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help=f"print and record the loss every N mini-batches (default {NOTEBOOK_LOG_EVERY}, as the "
                        f"notebook; {SHORT_EPOCH_LOG_EVERY} when an epoch is shorter, e.g. the sample's 125 steps)")
    p.add_argument("--max-steps", type=int, default=d.max_steps,
                   help="stop after this many steps in all (the last epoch is then partial)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: capture the whole train step in a CUDA graph and replay it")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the step's forward and loss (its backward is compiled with it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)")
    p.add_argument("--parallel", choices=PARALLEL_KINDS, default=d.parallel,
                   help="data parallel under torchrun (torchrun --standalone --nproc_per_node=N -m l2fast.train "
                        "--parallel ddp|fsdp): DDP or FSDP2 (fully_shard), gloo on CPU, NCCL on CUDA; the global "
                        "batch stays --batch-size, split evenly over the ranks; rank 0 prints and writes")
    return p


def parse_config(argv=None):
    """The command line as a TrainConfig (UsageError for a malformed one)."""
    args = build_parser().parse_args(argv)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


# ----------------------------------------------------------------------------- training

def progress_bar(total, enabled):
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, leave=False, unit="step")


class Diverged(Exception):
    """Inside the loop: the first non-finite loss, at history row `index`."""

    def __init__(self, index, losses):
        super().__init__(index)
        self.index, self.losses = index, losses


def _check_finite(history, start, stop):
    """Diverged at the first non-finite row of history[start:stop] (earlier rows were checked)."""
    bad = engine.first_non_finite(history[start:stop])
    if bad is not None:
        raise Diverged(start + bad, history[start + bad].tolist())


def run_epoch(step, perm, n_steps, batch_size, epoch, log_every, history, first_step, show_progress,
              reduce_rows=None):
    """n_steps steps over the batches of `perm`; each step's losses go to history[first_step + i].
    Prints the notebook's line every log_every steps; returns (seconds, metrics records). Raises
    Diverged at the first log line or epoch end after a non-finite loss (those are the host syncs).
    reduce_rows(rows), data parallel: the rows' mean over ranks, in place; called on the rows since
    the last call at each log line and at the epoch end only, so steps in between need no collective."""
    device = perm.device
    bar = progress_bar(n_steps, show_progress)
    records = []
    reduced = first_step  # history rows before this one hold values averaged over the ranks
    engine.synchronize(device)
    start = time.perf_counter()
    try:
        for i in range(n_steps):
            losses = step(perm[i * batch_size:(i + 1) * batch_size])
            history[first_step + i].copy_(losses)
            if (i + 1) % log_every == 0:
                if reduce_rows is not None:
                    reduce_rows(history[reduced:first_step + i + 1])
                    reduced = first_step + i + 1
                loss, data_loss, l2_loss = history[first_step + i].tolist()  # the only host sync inside the epoch
                if not all(map(math.isfinite, (loss, data_loss, l2_loss))):
                    _check_finite(history, first_step, first_step + i + 1)
                message = LOG_LINE % (i + 1, loss, l2_loss)
                if bar is None:
                    print(message, flush=True)
                else:
                    bar.write(message)
                records.append({"epoch": epoch, "step": i + 1, "loss": loss, "data_loss": data_loss,
                                "l2_loss": l2_loss})
            if bar is not None:
                bar.update()
        if reduce_rows is not None:
            reduce_rows(history[reduced:first_step + n_steps])
        engine.synchronize(device)
        seconds = time.perf_counter() - start
        _check_finite(history, first_step, first_step + n_steps)
    except Diverged as d:
        d.records = records
        raise
    finally:
        if bar is not None:
            bar.close()
    return seconds, records


class _Run:
    """The state a run's outputs are written from, whichever way it ends; only the main process
    (rank 0 under torchrun) writes."""

    def __init__(self, config, out, metrics, info, ctx=None):
        self.config, self.out, self.metrics, self.info = config, out, metrics, info
        self.ctx = ctx or parallel.Context()
        self.records, self.epochs_done, self.steps_done = [], 0, 0
        self.checkpoint, self.finished = None, False  # model.pt once written; True once "completed" is

    def status(self, status, **extra):
        """metrics.jsonl and summary.json as the run stands; the summary even when the metrics cannot
        be written (their OutputError is raised after it)."""
        if self.metrics is None:
            return
        try:
            self.metrics.write(self.records)
        finally:
            write_summary(self.out, {"status": status, "completed_epochs": self.epochs_done,
                                     "completed_steps": self.steps_done, **extra, **self.info})

    def end(self, failure, total_steps):
        """summary.json for a run ended early: "interrupted" when `failure` is None, else "failed"
        with its reason (see runs.recorded)."""
        end = {"last_completed_epoch": self.epochs_done, "total_steps": total_steps, "checkpoint": self.checkpoint}
        if failure is None:
            end = {"status": "interrupted", **end}
        else:
            end = {"status": "failed", "reason": failure_reason(failure), **end}
        with contextlib.suppress(L2fastError, OSError):  # nothing more can be done when it cannot be written
            self.status(**end)
        if failure is None and self.ctx.is_main:
            kept = "model.pt kept" if self.checkpoint else "no model.pt written"
            print(f"interrupted after {self.epochs_done} complete epoch(s); {self.out}/summary.json says so, {kept}",
                  file=sys.stderr, flush=True)


def train(config):
    """The whole run: data, model, the epochs, and the files in the run folder. Returns the summary
    dict (None on torchrun ranks other than 0). Raises UsageError/DataError/OutputError before
    training, DivergedError at a non-finite loss. Under torchrun (config.parallel), every rank calls
    it; the process group lives for the call and is destroyed on the way out, errors included."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(config).__name__}")
    config = dataclasses.replace(config)
    with parallel.shared_errors():  # the command line and environment: every rank finds the same
        config.check()
        parallel.check(config.parallel, config.batch_size)
    with parallel.session(config.parallel, config.device) as ctx:
        return _train(config, ctx)


def _setup(config, ctx):
    """The device, checked with the options that depend on it, before any data is read."""
    device = ctx.device if ctx else engine.resolve_device(config.device)
    if config.cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device (got --device {config.device} -> {device})")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the streams and the graph below use the current device
    engine.set_threads(config.threads, device)
    engine.check_penalty(config.penalty)
    return device


def _download(config):
    if config.download:
        print(f"downloading into {config.data_dir} ...", flush=True)
        download(config.dataset, config.data_dir)


def _load(config):
    """(dataset, steps per epoch, total steps)."""
    data = load_dataset(config.dataset, config.data_dir)
    steps_per_epoch = math.ceil(len(data.train_images) / config.batch_size)
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
    if total_steps > MAX_TOTAL_STEPS:
        raise UsageError(f"--epochs {config.epochs}: {total_steps:,} steps in all ({steps_per_epoch:,} per epoch); "
                         f"at most {MAX_TOTAL_STEPS:,} are supported (every step's loss is kept for loss.png): "
                         f"use fewer --epochs or --max-steps")
    return data, steps_per_epoch, total_steps


def _output_bytes():
    """About what the run folder's files take: the checkpoint's 4 bytes a parameter, and room for the
    metrics, summary.json and loss.png."""
    from .model import MLP

    with torch.device("meta"):
        return 4 * sum(p.numel() for p in MLP().parameters()) + OUTPUT_MARGIN


def _train(config, ctx):
    from .model import MLP

    wall_start = time.perf_counter()
    ctx = ctx or parallel.Context()  # one process: agree() just calls
    device = ctx.agree(_setup, config, ctx if ctx.kind else None)
    ctx.agree(_download, config, main_only=True)  # one rank downloads; the others then read its files
    data, steps_per_epoch, total_steps = ctx.agree(_load, config)
    out, metrics_path = ctx.agree(prepare_outputs, config.out, config.metrics, config.overwrite, _output_bytes(),
                                  main_only=True) or (None, None)
    if ctx.is_main:
        config.out, config.metrics = str(out), str(metrics_path)
    print(f"dataset: {data.name} ({data.source})", flush=True)

    batch = config.batch_size
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = ctx.wrap(MLP().to(device))
    optimizer, penalty = engine.optimizer_and_penalty(model, config.penalty, config.l2_weight, config.lr,  # after
                                                      config.weight_decay, config.cuda_graphs, config.adamw_impl)  # wrapping
    train_x, train_y, test_x, test_y = engine.to_device(data, device)
    step = engine.build_step(model, optimizer, train_x, train_y, penalty, batch, device,
                             compile=config.compile, cuda_graphs=config.cuda_graphs, shard=(ctx.rank, ctx.world))
    # Every rank, and every device, draws the same permutation: a CPU generator, copied to the device
    # once an epoch (CUDA's generator would give another order than the CPU's for the same seed).
    shuffle = torch.Generator().manual_seed(config.seed)

    if config.log_every is None:  # the notebook's 500, unless an epoch would then print no line at all
        config.log_every = NOTEBOOK_LOG_EVERY if steps_per_epoch >= NOTEBOOK_LOG_EVERY else SHORT_EPOCH_LOG_EVERY
    weight_decay = optimizer.param_groups[0]["weight_decay"]
    ranks = f"; {config.parallel} over {ctx.world} rank(s), {batch // ctx.world} images each" if ctx.kind else ""
    print(f"device: {engine.device_name(device)}; penalty: {config.penalty}, l2 weight {config.l2_weight:g}; "
          f"AdamW ({engine.adamw_impl_for(config.penalty, config.adamw_impl)}) lr {config.lr:g}, "
          f"weight decay {weight_decay:g}; "
          f"batch {batch}, {steps_per_epoch} steps/epoch, {total_steps} steps, logged every {config.log_every}"
          f"{ranks}; output: {out}", flush=True)

    info = settings(config, data, device, weight_decay, ctx)
    run = _Run(config, out, MetricsWriter(metrics_path) if ctx.is_main else None, info, ctx)
    with contextlib.closing(run.metrics or io.StringIO()), recorded(run, total_steps):
        run.status("running", total_steps=total_steps, checkpoint=None)
        history = torch.zeros(total_steps, 3, device=device)  # every step's losses, read at the end
        try:
            train_seconds, test_loss, test_accuracy = run_epochs(run, step, model, shuffle, history,
                                                                 train_x, test_x, test_y, steps_per_epoch)
        except Diverged as d:  # found alike on every rank: the history is averaged over them first
            error = _diverged(run, d, steps_per_epoch)
            error.shared_by_ranks = True
            raise error from None
        print("Training process has finished.", flush=True)

        trained = ctx.full_model(model, lambda: MLP(model_layer_sizes(model)))  # FSDP2: gathered on every rank
        if not ctx.is_main:
            return None
        history = history.tolist()
        summary = summarize(run, history, wall_start)
        checkpoint.save(out / checkpoint.CHECKPOINT_FILE, trained, config.plain(),
                        {"name": data.name, "data_dir": str(config.data_dir)})
        run.checkpoint = checkpoint.CHECKPOINT_FILE
        plot_losses(out / "loss.png", history, run.records, summary, steps_per_epoch)
        write_summary(out, summary)
        run.finished = True
    print(f"test accuracy {100 * test_accuracy:.2f}%, test loss {test_loss:.5f}; {run.steps_done} steps in "
          f"{train_seconds:.1f} s ({summary['steps_per_second']:.0f} steps/s); wrote {out}", flush=True)
    return summary


def model_layer_sizes(model):
    """The MLP's layer sizes, through a DDP wrapper too."""
    return getattr(model, "module", model).layer_sizes


def run_epochs(run, step, model, shuffle, history, train_x, test_x, test_y, steps_per_epoch):
    """The epochs, each followed by a test evaluation and the metrics file; returns
    (train seconds, last test loss, last test accuracy). run.epochs_done/steps_done follow along.
    Every rank evaluates the whole test set (FSDP2's forward is collective), so all agree."""
    config, batch, n_train, ctx = run.config, run.config.batch_size, len(train_x), run.ctx
    train_seconds, total_steps = 0.0, len(history)
    eval_model = model.module if ctx.kind == "ddp" else model
    reduce_rows = ctx.reduce_rows_ if ctx.world > 1 else None
    for epoch in range(1, math.ceil(total_steps / steps_per_epoch) + 1):
        print(f"Starting epoch {epoch}", flush=True)
        perm = torch.randperm(n_train, generator=shuffle).to(train_x.device, non_blocking=True)
        n_steps = min(steps_per_epoch, total_steps - run.steps_done)
        seconds, logged = run_epoch(step, perm, n_steps, batch, epoch, config.log_every, history,
                                    run.steps_done, not config.no_progress and ctx.is_main, reduce_rows)
        test_loss, test_accuracy = engine.evaluate(eval_model, test_x, test_y)
        sq_norm = engine.param_sq_norm(model)  # for loss.png: what the L2 term penalises, even at weight 0
        samples_per_second = min(n_steps * batch, n_train) / seconds
        print(f"Epoch {epoch}: test loss {test_loss:.5f}, test accuracy {100 * test_accuracy:.2f}% "
              f"({len(test_x):,} images); {seconds:.2f} s, {samples_per_second:,.0f} samples/s", flush=True)
        run.records += logged + [{"epoch": epoch, "test_loss": test_loss, "test_accuracy": test_accuracy,
                                  "epoch_seconds": seconds, "samples_per_second": samples_per_second,
                                  "param_sq_norm": sq_norm}]
        run.epochs_done, run.steps_done = epoch, run.steps_done + n_steps
        train_seconds += seconds
        run.status("running", total_steps=total_steps, checkpoint=None)
    return train_seconds, test_loss, test_accuracy


def _diverged(run, d, steps_per_epoch):
    """Write the diverged run's metrics and summary (no checkpoint); the DivergedError to raise."""
    index, (loss, data_loss, l2_loss) = d.index, d.losses
    epoch, step_in_epoch = index // steps_per_epoch + 1, index % steps_per_epoch + 1
    where = {"epoch": epoch, "step": step_in_epoch, "global_step": index + 1}
    run.records += d.records + [{**where, "loss": loss, "data_loss": data_loss, "l2_loss": l2_loss,
                                 "diverged": True}]
    run.status("diverged", diverged_at=where, last_completed_epoch=run.epochs_done, checkpoint=None)
    return DivergedError(f"training diverged: the loss is {loss} (data loss {data_loss}, l2 loss {l2_loss}) at "
                         f"mini-batch {step_in_epoch} of epoch {epoch} (step {index + 1}); no model.pt written, "
                         f"{run.out}/summary.json says \"diverged\"; lower --lr or --l2-weight")


def settings(config, data, device, weight_decay, ctx):
    """The settings a run's summary records, whatever its status."""
    return {
        "parallel": {"kind": ctx.kind, "world_size": ctx.world} if ctx.kind else None,
        "device": engine.device_name(device), "penalty": config.penalty, "l2_weight": config.l2_weight,
        "weight_decay": weight_decay, "lr": config.lr, "adamw_impl": engine.adamw_impl_for(config.penalty, config.adamw_impl),
        "batch_size": config.batch_size, "seed": config.seed, "cuda_graphs": config.cuda_graphs,
        "compile": config.compile,
        "dataset": {"name": data.name, "data_dir": str(config.data_dir), "source": data.source,
                    "train_size": len(data.train_labels), "test_size": len(data.test_labels)},
        "versions": checkpoint.versions(),
    }


def summarize(run, history, wall_start):
    """summary.json's content: final metrics, timings, and the settings that produced them."""
    epochs = [r for r in run.records if "test_accuracy" in r]
    last_epoch, train_seconds = epochs[-1], sum(r["epoch_seconds"] for r in epochs)
    return {
        "status": "completed", "checkpoint": checkpoint.CHECKPOINT_FILE,
        "test_accuracy": last_epoch["test_accuracy"], "test_loss": last_epoch["test_loss"],
        "final_loss": history[-1][0], "final_data_loss": history[-1][1], "final_l2_loss": history[-1][2],
        "param_sq_norm": last_epoch["param_sq_norm"],  # measured on the trained weights at the last epoch's end
        "epochs": len(epochs), "steps": len(history), "train_seconds": train_seconds,
        "steps_per_second": len(history) / train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        **run.info,
    }


def main(argv=None):
    config = parse_config(argv)
    if parallel.is_secondary():
        return _secondary_main(config)
    with _cli.sigterm_raises(KeyboardInterrupt):  # SIGTERM ends a run as Ctrl-C does: "interrupted"
        train(config)
    return 0


def _secondary_main(config):
    """A torchrun rank other than 0: the same run, printing nothing; an error that rank 0 reports as
    well only sets the exit code, one found here alone is printed with this rank's number."""
    rank = parallel.torchrun_env()[0]
    with _cli.sigterm_raises(KeyboardInterrupt), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        try:
            train(config)
        except L2fastError as e:
            if not parallel.reported_by_rank0(e):
                _cli.error(f"rank {rank}: {e}")
            return e.exit_code
        except KeyboardInterrupt:
            return 130
    return 0


def cli(argv=None):
    """main() as a command: usage, data and output errors print `error: ...` and return 2."""
    return _cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
