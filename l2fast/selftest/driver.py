"""A small CUDA workload for compute-sanitizer: `python -m l2fast.selftest.driver [cuda|cpu]`.

Every op, dtype and mode at chunk boundaries, views, zero-size tensors, 1,000 tensors, per-tensor
weights, a CUDA graph replay and two streams, each checked against float64 (exit 1 if wrong). And
what the small cases never reach: a ~20 MB tensor (64 KB chunks, so the kernel's unrolled 4x16-byte
loop runs) with a view of it at an odd element offset (element loads), beside 1,500 one-element
tensors (more chunks than blocks: every block walks on to further chunks, reusing its shared
memory), in float32, float16 and bfloat16, in every mode.
Small otherwise: under racecheck every shared-memory access is tracked.
"""
import os
import sys

import torch

BIG_BYTES = 20 << 20
N_ONES = 1500


def main_loop_and_walk(dev, ref):
    """A ~20 MB tensor, a view of another at an odd element offset and 1,500 one-element tensors, in
    one call per mode and dtype; checked through concatenations (a check per tensor would be slow
    under the sanitizers)."""
    import l2fast

    from . import refs

    w = refs.WEIGHT
    for d, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        n = BIG_BYTES // torch.tensor([], dtype=dtype).element_size()
        big = refs.randn((n,), dtype, dev, 10 + d)
        odd = refs.randn((n // 2 + 1,), dtype, dev, 20 + d)[1:]  # starts one element in: not 16-byte aligned
        ones = refs.randn((N_ONES,), dtype, dev, 30 + d)
        params = [big, odd, *ones.split(1)]
        flat = [big, odd, ones]  # the same values, three tensors for the reference

        def grads_like(seed, fill=None):
            gs = [refs.randn(t.shape, dtype, dev, seed + k) if fill is None else torch.full_like(t, fill)
                  for k, t in enumerate(flat)]
            return gs, [gs[0], gs[1], *gs[2].split(1)]

        expected = w * ref.sq_norm(flat)
        refs.check_value("l2_penalty (value)", l2fast.l2_penalty(params, w), expected, params, dev)
        refs.check_value("sq_norm", l2fast.sq_norm(params), ref.sq_norm(flat), params, dev)
        for fresh in (False, True):  # accumulate into existing grads; overwrite NaN-filled ones
            gflat, grads = grads_like(40 + d, float("nan") if fresh else None)
            old = None if fresh else [g.clone() for g in gflat]
            value = torch.ops.l2fast.l2_penalty_(params, grads, w, list(range(len(params))) if fresh else [])
            refs.check_value("l2_penalty_", value, expected, params, dev)
            for k, (g, t) in enumerate(zip(gflat, flat)):
                refs.check_grad_update(f"grads ({dtype}, part {k})", g, None if fresh else old[k], t, 2 * w, ref)
        bgrads = torch.ops.l2fast.l2_penalty_backward(torch.tensor(0.5, device=dev), params, w)
        for k, (g, t) in enumerate(zip([bgrads[0], bgrads[1], torch.cat(bgrads[2:])], flat)):
            refs.check_grad_update(f"backward ({dtype}, part {k})", g, None, t, w, ref)
        leaves = [p.detach().requires_grad_() for p in params]
        agrads = torch.autograd.grad(l2fast.l2_penalty(leaves, w), leaves)
        for k, (g, t) in enumerate(zip([agrads[0], agrads[1], torch.cat(agrads[2:])], flat)):
            refs.check_grad_update(f"autograd ({dtype}, part {k})", g, None, t, 2 * w, ref)


def main(argv=None):
    import l2fast  # noqa: F401  (registers the ops)

    from . import checks_ops, refs
    from .checks_cuda import graph_check
    from .runner import Context, Skip

    argv = sys.argv[1:] if argv is None else argv
    device = argv[0] if argv else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("selftest driver: no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(device)
    ref = refs.Reference()
    sizes = [1, 3, 255, 257, 8191, 8193, 16383, 16384, 16385, 32769]
    for d, dtype in enumerate(refs.DTYPES):
        for mode in checks_ops.MODES:
            params = [refs.randn((n,), dtype, dev, 100 * d + i) for i, n in enumerate(sizes)]
            checks_ops.RUN[mode](params, dev, ref)
    ctx = Context(quick=True)
    for check in (checks_ops.views_check(device), checks_ops.zero_size_check(device), checks_ops.weights_check(device)):
        try:
            check.fn(ctx)
        except Skip:
            pass
    # 1,000 tensors (the table no longer fits a kernel parameter), checked through one concatenation
    params = [refs.randn((k % 50,), torch.float32, dev, k) for k in range(1000)]
    grads = [refs.randn((k % 50,), torch.float32, dev, 7 + k) for k in range(1000)]
    flat_p, flat_g = torch.cat(params), torch.cat(grads)
    value = torch.ops.l2fast.l2_penalty_(params, grads, refs.WEIGHT, list(range(0, 1000, 2)))
    refs.check_value("1,000 tensors", value, refs.WEIGHT * ref.sq_norm([flat_p]), params, dev)
    kept = torch.cat([torch.full_like(g, k % 2) for k, g in enumerate(grads)]).bool()  # odd: not fresh
    refs.check_grad_update("1,000 tensors' grads", torch.cat(grads), torch.where(kept, flat_g, 0), flat_p,
                           2 * refs.WEIGHT, ref)
    main_loop_and_walk(dev, ref)
    if device == "cpu":
        print("selftest driver: ok", flush=True)
        return 0
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":  # graphs need the caching allocator
        graph_check().fn(ctx)
    # two streams at once on separate data
    streams = [torch.cuda.Stream() for _ in range(2)]
    work = [[refs.randn((40_000,), torch.float32, dev, s), refs.randn((777,), torch.float16, dev, s)] for s in range(2)]
    grads = [[torch.zeros_like(p) for p in ps] for ps in work]
    values = [None, None]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    for k, s in enumerate(streams):
        with torch.cuda.stream(s):
            values[k] = torch.ops.l2fast.l2_penalty_(work[k], grads[k], refs.WEIGHT, [])
    torch.cuda.synchronize()
    for k in range(2):
        refs.check_value("two streams", values[k], refs.WEIGHT * ref.sq_norm(work[k]), work[k], dev)
        for p, g in zip(work[k], grads[k]):
            refs.check_grad_update("two streams grad", g, None, p, 2 * refs.WEIGHT, ref)
    torch.cuda.synchronize()
    print("selftest driver: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
