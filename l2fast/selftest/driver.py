"""A small CUDA workload for compute-sanitizer: `python -m l2fast.selftest.driver [cuda|cpu]`.

Every op, dtype and mode at chunk boundaries, views, zero-size tensors, 1,000 tensors, per-tensor
weights, a CUDA graph replay and two streams, each checked against float64 (exit 1 if wrong). And
what the small cases never reach: a ~20 MB tensor (64 KB chunks, so the kernel's unrolled 4x16-byte
loop runs) with a view of it at an odd element offset (element loads), beside 1,500 one-element
tensors (more chunks than blocks: every block walks on to further chunks, reusing its shared
memory), in float32, float16 and bfloat16, in every mode. l2fast.optim.AdamW likewise: the
self-test's step against float64 (4 dtypes, 3 groups), and the same big, odd and one-element params
in 6 groups (device tensor and group tables; blocks rewrite their shared constants tensor after
tensor) with GradScaler, a step and a skipped one.
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


def adamw_walk(dev):
    """One AdamW step (grads scaled by 2, unscaled in the step) and one GradScaler skips, over a ~20 MB
    param, a view at an odd element offset (group 0) and 1,500 one-element params in groups 1..5
    (every param's state a view of one buffer); checked per group through the buffers."""
    from ..optim import AdamW
    from . import refs
    from .checks_optim import _hyper, adamw_reference, close_to, param_group

    for d, dtype in enumerate((torch.float32, torch.bfloat16)):
        n = BIG_BYTES // torch.tensor([], dtype=dtype).element_size()
        hyper = [_hyper(k) for k in range(6)]
        parts = [(n,), (n // 2 + 1,), (N_ONES,)]  # big, odd (from element 1 on), ones
        bufs = {key: [refs.randn(s, dtype, dev, 60 + 10 * d + 3 * i + j) * scale for i, s in enumerate(parts)]
                for j, (key, scale) in enumerate((("p", 1.0), ("g", 2e-2), ("m", 1e-3)))}
        bufs["v"] = [b.abs() * 0.1 for b in bufs["m"]]
        bufs["vmax"] = [b * 1.5 for b in bufs["v"]]
        views = {key: [b[0], b[1][1:], *b[2].split(1)] for key, b in bufs.items()}
        before = {key: [t.clone() for t in ts] for key, ts in views.items() if key != "g"}
        before["g"] = [t / 2 for t in views["g"]]
        params = [torch.nn.Parameter(t) for t in views["p"]]
        members = [[0, 1]] + [[2 + i for i in range(k, N_ONES, 5)] for k in range(5)]
        groups = [param_group([params[i] for i in idx], h) for idx, h in zip(members, hyper)]
        opt = AdamW(groups)
        for k, idx in enumerate(members):
            for i in idx:
                params[i].grad = views["g"][i]
                st = opt.state[params[i]]
                st.update(step=torch.tensor(3.0, device=dev), exp_avg=views["m"][i], exp_avg_sq=views["v"][i])
                if hyper[k]["amsgrad"]:
                    st["max_exp_avg_sq"] = views["vmax"][i]
        opt.grad_scale, opt.found_inf = torch.tensor(2.0, device=dev), torch.tensor(0.0, device=dev)
        opt.step()
        total = 0.0
        for k, idx in enumerate(members):
            def cat(key, ts=None):
                return torch.cat([(views if ts is None else ts)[key][i].flatten() for i in idx])
            g_before = cat("g", before)
            want = adamw_reference(cat("p", before), g_before, cat("m", before), cat("v", before),
                                   cat("vmax", before) if hyper[k]["amsgrad"] else None, 4, **hyper[k])
            total += want[4]
            what = f"AdamW {refs.dtype_name(dtype)} group {k}"
            close_to(f"{what} param", cat("p"), want[0], dtype, want[5]["p"])
            close_to(f"{what} exp_avg", cat("m"), want[1], dtype, want[5]["m"])
            close_to(f"{what} exp_avg_sq", cat("v"), want[2], dtype, want[5]["v"])
            close_to(f"{what} unscaled grad", cat("g"), g_before.double(), dtype, g_before.double().abs())
            if want[3] is not None:
                close_to(f"{what} max_exp_avg_sq", cat("vmax"), want[3], dtype, want[3].abs())
        refs.check_value(f"AdamW {refs.dtype_name(dtype)} penalty", opt.penalty, total, params, dev)
        written = [b for key in ("p", "m", "v") for b in bufs[key]]
        after = refs.snapshot(written)
        opt.found_inf.fill_(1.0)
        opt.step()
        refs.check_value(f"AdamW {refs.dtype_name(dtype)} penalty, step skipped", opt.penalty,
                         sum(h["l2_weight"] * sum((views["p"][i].double() ** 2).sum().item() for i in idx)
                             for h, idx in zip(hyper, members)), params, dev)
        refs.check_unchanged(f"AdamW {refs.dtype_name(dtype)}: params and state after a step GradScaler skipped",
                             written, after)


def main(argv=None):
    import l2fast  # noqa: F401  (registers the ops)

    from . import checks_ops, checks_optim, refs
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
    checks_optim.values_check(device).fn(ctx)
    adamw_walk(dev)
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
