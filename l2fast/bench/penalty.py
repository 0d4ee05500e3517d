"""`python -m l2fast.bench penalty`: penalty value + gradient into .grad, fused vs the baselines.

Per call, every method computes weight * sum(||p||^2) and adds 2 * weight * p into each grad:
  fused     l2fast.l2_penalty_ (one pass over params and grads)
  autograd  l2fast.l2_penalty + backward (forward pass, then the fused backward kernel)
  seed      the notebook: torch.cat of p.view(-1), square, sum, backward
  foreach   torch._foreach_norm + stack + sum + torch._foreach_add_ (the best plain PyTorch)
  compiled  torch.compile of `foreach`
  copy      memory floor: one copy_ moving the same bytes the fused op must move
            (read params + read grads + write grads)
"""
import argparse
import sys

import torch

import l2fast
from l2fast.bench.timing import compare
from l2fast.model import MLP

WEIGHT = 1e-4
SIZES = {"mlp": None, "1M": 1_000_000, "10M": 10_000_000, "50M": 50_000_000,
         "100M": 100_000_000, "1B": 1_000_000_000}


def make_params(size, device, n_tensors, seed=0):
    """The seed MLP's parameters, or `size` float32 values spread over n_tensors tensors of
    log-uniformly varying sizes (like a real model: large matrices and small vectors)."""
    torch.manual_seed(seed)
    if size is None:
        return [p.detach().to(device).requires_grad_() for p in MLP().parameters()]
    weights = torch.rand(n_tensors, generator=torch.Generator().manual_seed(seed)).mul(8).exp()
    counts = (weights / weights.sum() * size).long().clamp(min=1)
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
    methods = {
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m l2fast.bench penalty", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--sizes", default="mlp,1M,10M,50M",
                        help=f"comma-separated, from {','.join(SIZES)} (default: mlp,1M,10M,50M)")
    parser.add_argument("--tensors", type=int, default=200, help="tensors the non-MLP sizes are spread over")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds; the median is kept")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; expected some of {','.join(SIZES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# l2fast.bench penalty on {name}; torch {torch.__version__}; weight {WEIGHT}; "
          f"median of {args.rounds} interleaved rounds")
    cols = ["fused", "autograd", "seed", "foreach"] + ([] if args.no_compile else ["compiled"]) + ["copy"]
    print("| values | tensors | " + " | ".join(f"{c} µs" for c in cols)
          + " | seed/fused | foreach/fused | " + ("compiled/fused | " if not args.no_compile else "")
          + "fused GB/s | fused/copy time | fused rel. error | foreach rel. error |")
    print("|" + "---|" * (2 + len(cols) + (4 if not args.no_compile else 3) + 3))
    for size in sizes:
        params = make_params(SIZES[size], device, args.tensors)
        errors = check_agreement(params, device)
        t = compare(methods_for(params, device, not args.no_compile), device, rounds=args.rounds)
        numel = sum(p.numel() for p in params)
        ratios = [t["seed"] / t["fused"], t["foreach"] / t["fused"]]
        if not args.no_compile:
            ratios.append(t["compiled"] / t["fused"])
        gbps = 3 * 4 * numel / t["fused"] / 1e9
        print(f"| {numel:,} | {len(params)} | " + " | ".join(f"{t[c] * 1e6:,.1f}" for c in cols) + " | "
              + " | ".join(f"{r:.1f}×" for r in ratios) + f" | {gbps:.1f} | {t['fused'] / t['copy']:.2f}× | {errors[0]:.1e} | {errors[1]:.1e} |",
              flush=True)
        del params
    return 0


if __name__ == "__main__":
    sys.exit(main())
