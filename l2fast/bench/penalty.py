"""`python -m l2fast.bench penalty`: penalty value + gradient into .grad, fused vs the baselines.

Per call, every method computes weight * sum(||p||^2) and adds 2 * weight * p into each grad:
  L2Penalty l2fast.L2Penalty(params, weight).add_grad_(), built once (what a training loop uses)
  fused     l2fast.l2_penalty_(params, weight), the functional form (checks its arguments per call)
  autograd  l2fast.l2_penalty + backward (forward pass, then the fused backward kernel)
  seed      the notebook: torch.cat of p.view(-1), square, sum, backward
  foreach   torch._foreach_norm + stack + sum + torch._foreach_add_ (the best plain PyTorch)
  compiled  torch.compile of `foreach`
  copy      memory floor: one copy_ moving the same bytes the fused op must move
            (read params + read grads + write grads)
Goals: L2Penalty within 1.3x of copy at the MLP's size and at 1M values, at most copy's time
from 10M values, and at least 3x faster than foreach up to 1M values.
"""
import sys

import l2fast
from l2fast import _cli
from l2fast.errors import UsageError

# imported on first use: `--help` and option errors cost no torch import
torch, timing, model = map(_cli.LazyModule, ("torch", "l2fast.bench.timing", "l2fast.model"))

WEIGHT = 1e-4
# Peak bytes per float32 value at one size: params and grads (8), the copy's source and destination
# (12), the seed's torch.cat and its square (8), less what is freed between methods; measured: 22
# (peak RSS over the MLP-size run's, --sizes 10M --no-compile, CPU).
BYTES_PER_VALUE = 24
MAX_COMPILED_TENSORS = 1_000  # with the torch.compile baseline: --sizes 1M --tensors 1000 took 270 s, 100,000 hours
SIZES = {"mlp": None, "1M": 1_000_000, "10M": 10_000_000, "50M": 50_000_000,
         "100M": 100_000_000, "1B": 1_000_000_000}


def make_params(size, device, n_tensors, seed=0):
    """The seed MLP's parameters, or `size` float32 values spread over n_tensors tensors of
    log-uniformly varying sizes (like a real model: large matrices and small vectors)."""
    torch.manual_seed(seed)
    if size is None:
        return [p.detach().to(device).requires_grad_() for p in model.MLP().parameters()]
    if not 1 <= n_tensors <= size:
        raise ValueError(f"{n_tensors} tensors for {size} values: expected 1 to {size} tensors")
    weights = torch.rand(n_tensors, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(8).exp()
    # One value each, the rest spread by weight; what the rounding down leaves goes to the first.
    counts = 1 + (weights / weights.sum() * (size - n_tensors)).long()
    counts[0] += size - counts.sum()
    return [torch.randn(int(n), device=device).requires_grad_() for n in counts]


def seed_way(params, weight):
    l2 = weight * torch.cat([p.view(-1) for p in params]).square().sum()
    l2.backward()
    return l2.detach()


def foreach_way(params, grads, weight):
    value = weight * torch.stack(torch._foreach_norm(params)).square().sum()
    torch._foreach_add_(grads, params, alpha=2 * weight)
    return value


def autograd_way(params, weight):
    value = l2fast.l2_penalty(params, weight)
    value.backward()
    return value.detach()


def methods_for(params, device, with_compile):
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    plain = [p.detach() for p in params]
    numel = sum(p.numel() for p in params)
    src = torch.empty(numel * 3 // 2, device=device)
    dst = torch.empty_like(src)
    penalty = l2fast.L2Penalty(params, WEIGHT)
    methods = {
        "L2Penalty": penalty.add_grad_,
        "fused": lambda: l2fast.l2_penalty_(params, WEIGHT),
        "autograd": lambda: autograd_way(params, WEIGHT),
        "seed": lambda: seed_way(params, WEIGHT),
        "foreach": lambda: foreach_way(plain, grads, WEIGHT),
    }
    if with_compile:
        compiled = torch.compile(foreach_way, dynamic=False)
        methods["compiled"] = lambda: compiled(plain, grads, WEIGHT)
    methods["copy"] = lambda: dst.copy_(src)
    return methods


def check_agreement(params, device):
    """Before timing: the fused op must match a float64 reference (value to 1e-6, grads exactly as
    float32 rounding allows). Returns the relative value error of fused and of the foreach baseline
    (torch's float32 `_foreach_norm` drifts on large tensors, pytorch/pytorch#68326)."""
    a = [p.detach().clone() for p in params]
    ga, gb = [torch.ones_like(p) for p in a], [torch.ones_like(p) for p in a]
    for p, g in zip(a, ga):
        p.grad = g
    exact = WEIGHT * sum((p.double() ** 2).sum().item() for p in a)
    fused = l2fast.l2_penalty_(a, WEIGHT).item()
    foreach = foreach_way(a, gb, WEIGHT).item()
    if abs(fused - exact) > 1e-6 * exact:
        raise AssertionError(f"fused penalty {fused!r} is off the float64 reference {exact!r}")
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    return abs(fused - exact) / exact, abs(foreach - exact) / exact


def add_arguments(parser):
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--sizes", default="mlp,1M,10M,50M",
                        help=f"comma-separated, from {','.join(SIZES)} (default: mlp,1M,10M,50M)")
    parser.add_argument("--tensors", type=int, default=200, help="tensors the non-MLP sizes are spread over")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds; the median is kept")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")


def parse_sizes(text):
    """--sizes as a list of SIZES' names; a UsageError for a name it does not have."""
    sizes = text.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise UsageError(f"--sizes: unknown size {unknown[0]!r}; expected some of {','.join(SIZES)}")
    return sizes


def check_tensor_counts(sizes, counts, sizes_text, tensors_text):
    """Each non-MLP size in `sizes` spread over its count in `counts`: a UsageError where a size has
    fewer values than its tensors (each tensor holds at least one), naming the smallest such size."""
    spread = sorted((SIZES[s], c) for s, c in zip([s for s in sizes if SIZES[s] is not None], counts))
    for values, count in spread:
        if count > values:
            raise UsageError(f"--tensors {tensors_text}: more tensors than the {values:,} values of --sizes "
                             f"{sizes_text} (each tensor holds at least one); expected 1 to {values:,}")


def check_memory(sizes, device, bytes_per_value, what):
    """A UsageError when the largest of `sizes` needs more than `device` has free (`what`: what the
    bytes a value are)."""
    available = available_memory(device)
    largest = max(sizes, key=lambda s: SIZES[s] or 0)
    need = bytes_per_value * (SIZES[largest] or 0)
    if available is not None and need > available:
        raise UsageError(f"--sizes {largest}: about {need / 1e9:.1f} GB ({bytes_per_value} bytes a value: {what}), "
                         f"{available / 1e9:.1f} GB available on {device}; leave out the larger sizes")


def check_args(args):
    """The options as plain values; a UsageError (one line, exit 2) for anything that cannot run."""
    sizes = parse_sizes(args.sizes)
    if args.tensors < 1:
        raise UsageError(f"--tensors {args.tensors}: expected at least 1 tensor")
    if args.tensors > MAX_COMPILED_TENSORS and not args.no_compile:
        raise UsageError(f"--tensors {args.tensors}: torch.compile's build of the `compiled` baseline grows faster than "
                         f"the tensor count (4.5 min at {MAX_COMPILED_TENSORS:,} on a 2-core CPU); add --no-compile "
                         f"above {MAX_COMPILED_TENSORS:,}")
    check_tensor_counts(sizes, [args.tensors] * len(sizes), args.sizes, args.tensors)
    if args.rounds < 1:
        raise UsageError(f"--rounds {args.rounds}: expected at least 1 round")
    device = kernel_device(args.device)
    check_memory(sizes, device, BYTES_PER_VALUE, "params, grads, the copy's buffers, the seed's torch.cat")
    return sizes, device


def kernel_device(name):
    """--device as a torch.device l2fast has kernels for here; a UsageError (one line, exit 2) otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; expected cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: l2fast has kernels for cpu and cuda only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and not l2fast.build_info()["cuda"]:
        raise UsageError(f"--device {name}: this l2fast build has no CUDA kernels")
    return device


def available_memory(device):
    """Bytes the benchmark may still allocate on `device`, or None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def run(args):
    sizes, device = check_args(args)
    with_compile = not args.no_compile
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# l2fast.bench penalty on {name}; torch {torch.__version__}; weight {WEIGHT}; "
          f"median of {args.rounds} interleaved rounds")
    cols = ["L2Penalty", "fused", "autograd", "seed", "foreach"] + (["compiled"] if with_compile else []) + ["copy"]
    ratio_cols = ["L2Penalty/copy", "fused/copy", "foreach/L2Penalty", "seed/L2Penalty"]
    print("| values | tensors | " + " | ".join(f"{c} µs" for c in cols) + " | " + " | ".join(ratio_cols)
          + " | L2Penalty GB/s | fused rel. error | foreach rel. error |")
    print("|" + "---|" * (2 + len(cols) + len(ratio_cols) + 3))
    for size in sizes:
        params = make_params(SIZES[size], device, args.tensors)
        errors = check_agreement(params, device)
        t = timing.compare(methods_for(params, device, with_compile), rounds=args.rounds)
        numel = sum(p.numel() for p in params)
        ratios = [t["L2Penalty"] / t["copy"], t["fused"] / t["copy"], t["foreach"] / t["L2Penalty"],
                  t["seed"] / t["L2Penalty"]]
        gbps = 3 * params[0].element_size() * numel / t["L2Penalty"] / 1e9
        print(f"| {numel:,} | {len(params)} | " + " | ".join(f"{t[c] * 1e6:,.1f}" for c in cols) + " | "
              + " | ".join(f"{r:.2f}×" for r in ratios) + f" | {gbps:.1f} | {errors[0]:.1e} | {errors[1]:.1e} |",
              flush=True)
        del params
    return 0


def main(argv=None):
    """`python -m l2fast.bench.penalty ...`: the same as `python -m l2fast.bench penalty ...`."""
    from l2fast.bench.__main__ import cli

    return cli(["penalty", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
