"""`python -m l2fast.bench optim`: one AdamW step with the coupled L2 penalty, l2fast.optim.AdamW vs the baselines.

Per call, every method but `fused` runs one AdamW step whose gradient includes the penalty's 2·w·p
and produces the penalty's value:
  fused      torch.optim.AdamW(fused=True).step() alone: no penalty at all (the floor to beat)
  L2Penalty  l2fast.L2Penalty(params, w).add_grad_() then torch's fused AdamW step (two passes)
  seed       the notebook: w·torch.cat(p).square().sum(), its backward, torch.optim.AdamW's step
             (torch's default implementation, as the notebook constructs it)
  optim      l2fast.optim.AdamW(params, l2_weight=w).step(): one pass; the value is .penalty
Sizes: the seed MLP's parameters, or float32 values spread over --tensors tensors of log-uniform
sizes (as `bench penalty`). Each size runs with every --threads count. Before timing, one step of
`optim` is checked against `L2Penalty` + torch's fused AdamW (params to float rounding, the value to
1e-6 of float64).
Goals (on a 2-core CPU): from 10M values optim <= 1.10x fused and <= 0.85x L2Penalty; at the
seed MLP's size optim <= 0.35x fused.
"""
import sys

import l2fast
from l2fast import _cli
from l2fast._cpu import max_threads
from l2fast.bench.penalty import SIZES, check_memory, check_tensor_counts, kernel_device, make_params, parse_sizes
from l2fast.errors import UsageError

# imported on first use: `--help` and option errors cost no torch import
torch, timing, l2optim = map(_cli.LazyModule, ("torch", "l2fast.bench.timing", "l2fast.optim"))

WEIGHT = 1e-4
LR = 1e-4
METHODS = ("fused", "L2Penalty", "seed", "optim")
# Bytes per float32 value at one size, estimated (not measured): the base params and grads (8), each
# method's params, grads and AdamW moments (4 x 16), the seed's torch.cat, its square and their grad (12).
BYTES_PER_VALUE = 84


def prepared(size, device, n_tensors, names=METHODS):
    """Params with grads of a backward's size: a copy for each of `names`."""
    base = make_params(size, device, n_tensors)
    gen = torch.Generator(device=device).manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen, device=device) * 1e-3 for p in base]

    def copy():
        params = [p.detach().clone().requires_grad_() for p in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return params

    return {name: copy() for name in names}


def seed_step(params, optimizer):
    l2 = WEIGHT * torch.cat([p.view(-1) for p in params]).square().sum()
    l2.backward()
    optimizer.step()
    return l2.detach()


def methods_for(params):
    """The step of each method in `params` (its own copy), and the l2fast.optim.AdamW."""
    methods = {}
    if "fused" in params:
        methods["fused"] = torch.optim.AdamW(params["fused"], lr=LR, fused=True).step
    if "L2Penalty" in params:
        pen_opt = torch.optim.AdamW(params["L2Penalty"], lr=LR, fused=True)
        penalty = l2fast.L2Penalty(params["L2Penalty"], WEIGHT)

        def l2penalty_step():
            value = penalty.add_grad_()
            pen_opt.step()
            return value

        methods["L2Penalty"] = l2penalty_step
    if "seed" in params:
        seed_opt = torch.optim.AdamW(params["seed"], lr=LR)
        methods["seed"] = lambda: seed_step(params["seed"], seed_opt)
    ours = l2optim.AdamW(params["optim"], lr=LR, l2_weight=WEIGHT)
    methods["optim"] = ours.step
    return methods, ours


def check_agreement(size, device, n_tensors):
    """One step from the same state: optim against L2Penalty + torch's fused AdamW (the same g + 2·w·p and
    update), the value against float64. Returns the value's relative error."""
    params = prepared(size, device, n_tensors, ("L2Penalty", "optim"))
    exact = WEIGHT * sum((p.detach().double() ** 2).sum().item() for p in params["optim"])
    methods, ours = methods_for(params)
    methods["optim"]()
    methods["L2Penalty"]()
    for a, b in zip(params["optim"], params["L2Penalty"]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    error = abs(ours.penalty.item() - exact) / exact
    if error > 1e-6:
        raise AssertionError(f"l2fast.optim.AdamW's penalty {ours.penalty.item()!r} is off the float64 value {exact!r}")
    return error


def add_arguments(parser):
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--sizes", default="mlp,1M,10M,50M",
                        help=f"comma-separated, from {','.join(SIZES)} (default: mlp,1M,10M,50M)")
    parser.add_argument("--tensors", default="200,40,40",
                        help="tensors the non-MLP sizes are spread over, per non-MLP size in order (the last "
                             "repeats; default 200,40,40: 1M over 200, 10M and 50M over 40)")
    parser.add_argument("--threads", default="1,all",
                        help="comma-separated torch thread counts, each a number or 'all' (default 1,all)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds; the median is kept")


def check_args(args):
    """(sizes, tensor counts, thread counts, device); a UsageError (one line, exit 2) for what cannot run."""
    sizes = parse_sizes(args.sizes)
    try:
        tensors = [int(t) for t in args.tensors.split(",")]
    except ValueError:
        raise UsageError(f"--tensors {args.tensors}: expected comma-separated counts") from None
    if not tensors or min(tensors) < 1:
        raise UsageError(f"--tensors {args.tensors}: expected counts of at least 1 tensor")
    threads = []
    for t in args.threads.split(","):
        count = max_threads() if t == "all" else int(t) if t.isdigit() else None
        if count is None or not 1 <= count <= max_threads():
            raise UsageError(f"--threads {args.threads}: {t!r} is not 'all' or a count from 1 to "
                             f"{max_threads()} (the CPUs this process may use)")
        if count not in threads:
            threads.append(count)
    counts = [tensors[min(i, len(tensors) - 1)] for i in range(sum(s != "mlp" for s in sizes))]
    check_tensor_counts(sizes, counts, args.sizes, args.tensors)
    if args.rounds < 1:
        raise UsageError(f"--rounds {args.rounds}: expected at least 1 round")
    device = kernel_device(args.device)
    check_memory(sizes, device, BYTES_PER_VALUE, "the base params and grads, each method's params, grads and "
                 "AdamW moments, the seed's torch.cat")
    if device.type == "cuda":  # host threads do not change a CUDA step
        threads = [torch.get_num_threads()]
    return sizes, counts, threads, device


def run(args):
    sizes, counts, threads, device = check_args(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# l2fast.bench optim on {name}; torch {torch.__version__}; l2 weight {WEIGHT}, lr {LR}; median of "
          f"{args.rounds} interleaved rounds; µs per step")
    ratios = ["optim/fused", "optim/L2Penalty", "seed/optim"]
    print("| values | tensors | threads | " + " | ".join(f"{m} µs" for m in METHODS) + " | " + " | ".join(ratios)
          + " | optim GB/s (28 B/value) | value rel. error |")
    print("|" + "---|" * (3 + len(METHODS) + len(ratios) + 2))
    old_threads = torch.get_num_threads()
    try:
        n_tensors = iter(counts)
        for size in sizes:
            tensors = None if size == "mlp" else next(n_tensors)
            for count in threads:
                torch.set_num_threads(count)
                error = check_agreement(SIZES[size], device, tensors)
                params = prepared(SIZES[size], device, tensors)
                methods, _ = methods_for(params)
                for fn in methods.values():  # state made, caches filled
                    fn()
                t = timing.compare(methods, rounds=args.rounds)
                numel = sum(p.numel() for p in params["optim"])
                row = [t["optim"] / t["fused"], t["optim"] / t["L2Penalty"], t["seed"] / t["optim"]]
                print(f"| {numel:,} | {len(params['optim'])} | {count} | "
                      + " | ".join(f"{t[m] * 1e6:,.1f}" for m in METHODS) + " | "
                      + " | ".join(f"{r:.2f}×" for r in row) + f" | {28 * numel / t['optim'] / 1e9:.1f} | {error:.1e} |",
                      flush=True)
                del params, methods
    finally:
        torch.set_num_threads(old_threads)
    return 0


def main(argv=None):
    """`python -m l2fast.bench.optim ...`: the same as `python -m l2fast.bench optim ...`."""
    from l2fast.bench.__main__ import cli

    return cli(["optim", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
