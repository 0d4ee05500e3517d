"""The training engine: device and threads, AdamW, the train step with an explicit L2 penalty
strategy, CUDAGraphStep, evaluation. Plain values in, tensors out; no options parsing, no files.

A step computes the notebook's loss, cross entropy + weight * sum(p^2) over every parameter, with
one of four penalty strategies (Penalty): OPTIMIZER applies the penalty inside the AdamW step
(l2fast.optim.AdamW: its gradient formed in registers, its value from the same pass); FUSED adds
the penalty's gradient after backward with one kernel (an l2fast.L2Penalty built once beside the
optimizer); AUTOGRAD and REFERENCE put a differentiable term in the loss (the l2fast op, or the
notebook's torch.cat formula). TrainStep's `shard=(rank, world)` trains one rank's share of each
global batch under DDP or FSDP2.
"""
import platform

import torch
from torch import nn

from . import distributed
from ._cpu import max_threads
from .choices import ADAMW_IMPLS, PENALTIES, Penalty  # noqa: F401  (engine.PENALTIES: the names the CLIs offer)
from .errors import UsageError

CUDA_GRAPH_WARMUP_STEPS = 3
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.manual_seed accepts


# ----------------------------------------------------------------------------- machine

def resolve_device(name):
    """torch.device for "auto", "cpu", "cuda" or "cuda:N"; UsageError for a device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: unsupported (expected auto, cpu, cuda or cuda:N)")
    return device


def check_threads(threads, what="--threads"):
    """UsageError unless threads is None, 0 (torch's default) or 1..CPU count (torch crashes far above)."""
    if threads is not None and not 0 <= threads <= max_threads():
        raise UsageError(f"{what} {threads}: expected 0 (torch's default) or a count from 1 to "
                         f"{max_threads()} (the CPUs this process may use)")


def set_threads(threads, device):
    """torch.set_num_threads: `threads`, or 1 on CPU when None; 0 leaves torch's default."""
    check_threads(threads)
    if threads is None:
        threads = 1 if device.type == "cpu" else 0
    if threads > 0:
        torch.set_num_threads(threads)


def check_seed(seed, what="--seed"):
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UsageError(f"{what} {seed}: expected an integer from -2**63 to 2**64-1 (torch's seed range)")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"


# ----------------------------------------------------------------------------- penalty strategies

def reference_l2(params, weight):
    """The notebook's L2 term: weight * sum of squares of all parameters, via torch.cat."""
    return weight * torch.square(torch.cat([p.view(-1) for p in params])).sum()


def _l2fast_ops():
    """The compiled op API; UsageError with a hint when the extension cannot be loaded."""
    try:
        from . import functional as ops
        ops.l2_penalty_  # noqa: B018  (loads the extension where that is lazy)
        return ops
    except Exception as e:  # noqa: BLE001  (ImportError, OSError from dlopen, RuntimeError)
        raise UsageError(f"the l2fast extension could not be loaded ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}); build it or use --penalty reference") from None


def check_penalty(kind):
    """UsageError now (before data or model exist) when `kind` needs the extension and it cannot load."""
    if Penalty(kind) is not Penalty.REFERENCE:
        _l2fast_ops()


class PenaltyStrategy:
    """How a step adds weight * sum(p^2) over `params`, bound once (as an optimizer is): `in_loss`
    strategies give `term()`, a differentiable loss term; FUSED gives `add_grad()`, called after
    backward: an l2fast.L2Penalty built here over every parameter (biases included, as the notebook)
    adds 2*weight*p into each .grad and returns the (detached) value; OPTIMIZER's `add_grad()` adds
    nothing and returns None: `optimizer` (an l2fast.optim.AdamW with this weight) applies the penalty
    in its step, and its `.penalty` is the value. Build it after DDP/FSDP2 wrapping: fully_shard
    replaces the parameters. Over DTensor params (FSDP2) every value is the global one, a plain
    tensor, on every rank."""

    def __init__(self, kind, weight, params, optimizer=None):
        self.kind, self.weight = Penalty(kind), float(weight)
        self.params = list(params)
        self.in_loss = self.kind in (Penalty.AUTOGRAD, Penalty.REFERENCE)
        if self.kind is Penalty.OPTIMIZER:
            from .optim import AdamW

            if not isinstance(optimizer, AdamW) or any(g["weight"] != self.weight for g in optimizer.param_groups):
                raise ValueError(f"penalty {self.kind.value}: expected the step's l2fast.optim.AdamW with l2_weight "
                                 f"{self.weight:g} (make_optimizer(..., impl='l2fast', l2_weight=...)), got "
                                 f"{type(optimizer).__name__}")
        elif self.kind is Penalty.FUSED:
            _l2fast_ops()
            from .penalty import L2Penalty

            self.l2_penalty = L2Penalty(self.params, self.weight)
        elif self.kind is Penalty.AUTOGRAD:
            self._fn = _l2fast_ops().l2_penalty
        else:
            self._fn = reference_l2

    def term(self):
        assert self.in_loss, self.kind
        return self._fn(self.params, self.weight)

    def add_grad(self):
        assert not self.in_loss, self.kind
        return None if self.kind is Penalty.OPTIMIZER else self.l2_penalty.add_grad_()


# ----------------------------------------------------------------------------- optimizer, data, step

def make_optimizer(model, lr, weight_decay=None, capturable=False, impl="default", l2_weight=None):
    """AdamW(lr) over model.parameters(); weight_decay=None keeps AdamW's default (0.01).

    impl picks only how the same update is computed: "default" is exactly the notebook's
    construction (torch's own choice: a loop over the parameters on CPU), "foreach", or "fused"
    (torch's fused AdamW, one kernel per step; the same update to float rounding). "l2fast" is
    l2fast.optim.AdamW, which also applies the coupled L2 penalty of weight `l2_weight` in its step
    (Penalty.OPTIMIZER; l2fast.train's default).
    """
    if impl not in (*ADAMW_IMPLS, "l2fast"):
        raise UsageError(f"AdamW implementation {impl!r}: expected one of {', '.join(ADAMW_IMPLS)}")
    kwargs = {} if weight_decay is None else {"weight_decay": weight_decay}
    if capturable:
        kwargs["capturable"] = True
    if impl == "l2fast":
        _l2fast_ops()
        from .optim import AdamW

        return AdamW(model.parameters(), lr=lr, l2_weight=l2_weight, **kwargs)
    if impl != "default":
        kwargs[impl] = True
    return torch.optim.AdamW(model.parameters(), lr=lr, **kwargs)


def optimizer_and_penalty(model, kind, weight, lr, weight_decay=None, capturable=False, impl="fused"):
    """A run's optimizer and PenaltyStrategy over model's parameters (built after DDP/FSDP2 wrapping):
    for OPTIMIZER, l2fast.optim.AdamW with the penalty inside (impl must then be "fused", the default:
    the step is one fused pass), otherwise torch's AdamW (impl) beside the strategy."""
    impl = adamw_impl_for(kind, impl)
    optimizer = make_optimizer(model, lr, weight_decay, capturable, impl, l2_weight=weight if impl == "l2fast" else None)
    return optimizer, PenaltyStrategy(kind, weight, model.parameters(), optimizer)


def adamw_impl_for(kind, impl):
    """The AdamW implementation a run with penalty `kind` and --adamw-impl `impl` steps with: "l2fast"
    for OPTIMIZER (which takes only the default, "fused": its step is one fused pass), else impl."""
    if Penalty(kind) is not Penalty.OPTIMIZER:
        return impl
    if impl != "fused":
        raise UsageError(f"--adamw-impl {impl} picks torch's AdamW; --penalty optimizer steps with "
                         f"l2fast.optim.AdamW (one fused pass): use --penalty fused with --adamw-impl {impl}")
    return "l2fast"


def to_device(data, device):
    """The dataset on the device, once: images as uint8 [N, 28, 28], labels as int64 [N]."""
    return tuple(torch.from_numpy(a).to(device) for a in
                 (data.train_images, data.train_labels, data.test_images, data.test_labels))


def scale_images(images_u8):
    """uint8 pixels -> float32 in [0, 1], ToTensor's own operation (img.float().div(255))."""
    return images_u8.float().div(255)


class TrainStep:
    """step(idx) trains on images[idx], labels[idx] (on-device tensors) and returns a detached
    float32 tensor [loss, data_loss, l2_loss] without synchronizing with the host.

    keep_grads: zero the grads in place instead of dropping them (what a CUDA graph needs: its
    kernels write to fixed addresses); otherwise backward hands its fresh grads over, no copy.
    shard=(rank, world): data parallel. idx is the global batch; this rank trains on its share,
    torch.tensor_split(idx, world)[rank], and its data loss is the share's cross-entropy sum times
    world / len(idx) (its mean when the shares are equal), so that gradients averaged over the ranks
    (DDP, FSDP2) are the global batch's mean gradient even for an uneven last batch, and the losses
    averaged over the ranks are the global batch's.
    """

    def __init__(self, model, optimizer, images, labels, penalty, compile=False, keep_grads=False, shard=(0, 1)):
        self.model, self.optimizer, self.images, self.labels = model, optimizer, images, labels
        self.penalty, self.keep_grads = penalty, keep_grads
        self.rank, self.world = shard
        self.loss_fn = nn.CrossEntropyLoss()
        forward = self._forward_with_term if penalty.in_loss else self._forward
        self.forward = torch.compile(forward) if compile else forward

    def _forward(self, idx, scale=None):
        x = scale_images(self.images.index_select(0, idx))
        logits, y = self.model(x), self.labels.index_select(0, idx)
        if scale is None:
            return self.loss_fn(logits, y)
        return nn.functional.cross_entropy(logits, y, reduction="sum") * scale

    def _forward_with_term(self, idx, scale=None):
        return self._forward(idx, scale), self.penalty.term()

    def __call__(self, idx):
        scale = None
        if self.world > 1:
            total = len(idx)
            idx = idx.tensor_split(self.world)[self.rank]
            if len(idx) * self.world != total:  # unequal shares (the last batch): weight by counts
                scale = self.world / total
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)
        if self.penalty.in_loss:
            data_loss, l2 = self.forward(idx, scale)
            loss = data_loss + l2
            loss.backward()
            self.optimizer.step()
        else:  # data-loss gradient first; the penalty's after it (FUSED, one kernel) or in the step (OPTIMIZER)
            data_loss = self.forward(idx, scale)
            data_loss.backward()
            l2 = self.penalty.add_grad()
            self.optimizer.step()
            if l2 is None:
                l2 = self.optimizer.penalty
            loss = data_loss.detach() + l2
        return torch.stack([loss.detach(), data_loss.detach(), l2.detach().to(loss.dtype)])


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


def build_step(model, optimizer, images, labels, penalty, batch_size, device, compile=False, cuda_graphs=False,
               shard=(0, 1)):
    """The step a trainer runs: TrainStep, wrapped in CUDAGraphStep when cuda_graphs."""
    step = TrainStep(model, optimizer, images, labels, penalty, compile=compile, keep_grads=cuda_graphs,
                     shard=shard)
    return CUDAGraphStep(step, batch_size, device) if cuda_graphs else step


def first_non_finite(losses):
    """Index of the first row of losses [steps, 3] holding a NaN or inf, or None; synchronizes."""
    bad = ~torch.isfinite(losses).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


# ----------------------------------------------------------------------------- evaluation

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
    """sum of p^2 over all parameters, as a Python float (inf or nan when the weights are). Over FSDP2's
    DTensor shards it is the global value, on every rank: each rank must call it (one all-reduce a tensor)."""
    total, dtensor = 0.0, distributed.dtensor_type() or ()
    with torch.no_grad():
        for p in model.parameters():
            part = p.double().square().sum()
            total += float(part.full_tensor() if isinstance(part, dtensor) else part)
    return total
