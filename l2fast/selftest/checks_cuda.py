"""CUDA-only checks, in process: one launch per call (every table size), no host sync (torch's sync
debug mode, and timed against a sleeping GPU), CUDA graphs, memory across captures, bits across
grids and alignments, accuracy on constant values, scales beyond float32, streams x threads, and a
tensor of more than 2^31 elements."""
import contextlib
import gc
import threading
import time

import torch

from . import refs
from .checks_ops import has_weights_argument
from .refs import WEIGHT, check_grad, check_grad_update, check_value, randn, snapshot
from .runner import Check, CheckFailed, Skip

MLP_SHAPES = [(64, 784), (64,), (32, 64), (32,), (10, 32), (10,)]  # the seed notebook's MLP


def _cuda():
    return torch.device("cuda", torch.cuda.current_device())


def _tensor_set(n, device, dtypes=(torch.float32,), seed=0):
    """n=6: the MLP's shapes; else n tensors of 0..699 elements."""
    if n == len(MLP_SHAPES):
        shapes = MLP_SHAPES
    else:
        g = torch.Generator().manual_seed(seed + n)
        shapes = [(s,) for s in torch.randint(0, 700, (n,), generator=g).tolist()]
    return [randn(s, dtypes[i % len(dtypes)], device, seed + i) for i, s in enumerate(shapes)]


def _calls(params, grads, device):
    """Every op once, on fixed inputs: name -> zero-argument callable."""
    import l2fast

    n = len(params)
    leaves = list(params)
    gout = torch.tensor(0.5, device=device)
    calls = {
        "l2_penalty_ (accumulate)": lambda: torch.ops.l2fast.l2_penalty_(params, grads, WEIGHT, []),
        "l2_penalty_ (fresh)": lambda: torch.ops.l2fast.l2_penalty_(params, grads, WEIGHT, list(range(n))),
        "l2fast.l2_penalty_ (p.grad)": lambda: l2fast.l2_penalty_(leaves, WEIGHT),
        "l2_penalty": lambda: torch.ops.l2fast.l2_penalty(params, WEIGHT),
        "sq_norm": lambda: torch.ops.l2fast.sq_norm(params),
        "l2_penalty_backward": lambda: torch.ops.l2fast.l2_penalty_backward(gout, params, WEIGHT),
    }
    if has_weights_argument():
        ws = [0.5 * (i % 3) for i in range(n)]
        calls["l2_penalty_ (weights)"] = lambda: torch.ops.l2fast.l2_penalty_(params, grads, WEIGHT, [], weights=ws)
    return calls


# --- one launch ----------------------------------------------------------------------------------

def placed(t, offset, device):
    """A copy of t on `device`, starting `offset` (< 16) elements into a fresh buffer of its own."""
    buf = torch.zeros(t.numel() + 16, dtype=t.dtype, device=device)
    return buf[offset:offset + t.numel()].view(t.shape).copy_(t)


@contextlib.contextmanager
def grid_limit(internal, limit):
    """Within the block, CUDA launches use at most `limit` blocks (0: the occupancy grid)."""
    previous = internal.set_grid_limit(limit)
    try:
        yield
    finally:
        internal.set_grid_limit(previous)


@contextlib.contextmanager
def no_host_sync():
    """Within the block, a host sync torch instruments is a CheckFailed naming it (sync debug mode)."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as e:
        raise CheckFailed(f"a host sync happened: {' '.join(str(e).split())[:300]}") from None
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _device_events(prof):
    """(kernel names, memcpy names, memset names) the profiler saw on the GPU."""
    from torch.autograd import DeviceType

    kernels, copies, sets = [], [], []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        kind = str(getattr(e, "activity_type", None) or "").lower()
        if e.name.startswith("Memcpy") or "memcpy" in kind:
            copies.append(e.name)
        elif e.name.startswith("Memset") or "memset" in kind:
            sets.append(e.name)
        else:
            kernels.append(e.name)
    return kernels, copies, sets


def launched_table(prof, kernel, sizes, n):
    """The name of the `kernel` the profiler saw, checked to carry the parameter table for n tensors:
    the smallest of `sizes` that holds them, else the device table."""
    table = next((k for k in _device_events(prof)[0] if kernel in k), "")
    size = next((m for m in sizes if n <= m), None)
    # the name as the profiler gives it: demangled, or not
    expected = ("DeviceTable",) if size is None else (f"TensorMeta, {size}>", f"TensorMetaELi{size}E")
    if "Table" in table and not any(e in table for e in expected):
        raise CheckFailed(f"{n} tensors launched {table!r}; expected the table {expected[0]!r}")
    return table


def one_launch_check():
    """One kernel per call; and no table copied while the list is unchanged (a kernel parameter up to
    672 tensors, a cached device table beyond). l2_penalty_backward makes new grads every call, so its
    table may change: its copies are reported, not held against it."""
    def fn(ctx):
        from torch.profiler import ProfilerActivity, profile

        dev = _cuda()
        calls_per_op = 5
        lines, seen_any = [], False
        for n in (6, 100, 1000):
            params = _tensor_set(n, dev)
            grads = [torch.randn_like(p) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            for name, call in _calls(params, grads, dev).items():
                for _ in range(3):  # warm-up: lazy module loading, allocator, the cached table
                    call()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls_per_op):
                        call()
                    torch.cuda.synchronize()
                kernels, copies, sets = _device_events(prof)
                seen_any = seen_any or bool(kernels or copies or sets)
                if seen_any and len(kernels) != calls_per_op:
                    raise CheckFailed(f"{name} on {n} tensors: {len(kernels)} kernels in {calls_per_op} calls "
                                      f"({sorted(set(kernels))}); expected exactly one per call")
                if seen_any and copies and "backward" not in name:
                    raise CheckFailed(f"{name} on {n} tensors: {len(copies)} memcpy in {calls_per_op} calls of an "
                                      "unchanged list; expected none (the table travels as a parameter or is cached)")
                lines.append(f"{name} x{n}: {len(kernels) / calls_per_op:g} kernel, {len(copies) / calls_per_op:g} "
                             f"memcpy, {len(sets) / calls_per_op:g} memset per call")
        if not seen_any:
            raise Skip("the profiler recorded no CUDA activity (is CUPTI available?)")
        return (f"exactly 1 kernel per call for {len(lines) // 3} call kinds x (6, 100, 1,000) tensors; no table "
                "copied for an unchanged list", "\n".join(lines))

    return Check("cuda one kernel launch per call (profiler)", fn, "cuda", estimate=8.0)


# --- no host sync --------------------------------------------------------------------------------

def no_sync_check():
    def fn(ctx):
        import l2fast

        dev = _cuda()
        ref = refs.Reference()
        sets = [_tensor_set(6, dev), _tensor_set(1000, dev, refs.DTYPES[:1] + refs.DTYPES[2:])]
        work = []
        for params in sets:  # everything allocated and warmed up before the mode is set
            grads = [torch.randn_like(p) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            calls = _calls(params, grads, dev)
            for call in calls.values():
                call()
            leaves = [p.detach().requires_grad_() for p in params]
            work.append((params, calls, leaves))
        torch.cuda.synchronize()
        for params, calls, leaves in work:
            for p in params:
                p.grad.zero_()
        g_old = [[p.grad.clone() for p in params] for params, _, _ in work]
        torch.cuda.synchronize()
        n = 0
        outs = []
        with no_host_sync():
            for params, calls, leaves in work:
                v = l2fast.l2_penalty_(params, WEIGHT)  # checked below against the reference
                for name, call in calls.items():
                    if "p.grad" not in name:
                        call()
                        n += 1
                for p in leaves:
                    p.grad = None
                (3 * l2fast.l2_penalty(leaves, WEIGHT)).backward()
                outs.append(v)
                n += 2
        torch.cuda.synchronize()
        worst = 0.0
        for (params, _, leaves), v, g0 in zip(work, outs, g_old):
            worst = max(worst, check_value("l2_penalty_", v, WEIGHT * ref.sq_norm(params), params, dev))
            for i, (p, old, leaf) in enumerate(zip(params, g0, leaves)):
                worst = max(worst, check_grad_update(f"params[{i}].grad", p.grad, old, p, 2 * WEIGHT, ref))
                worst = max(worst, check_grad_update(f"leaves[{i}].grad", leaf.grad, None, p, 6 * WEIGHT, ref))
        return (f"{n} calls (6 and 1,000 tensors, every op, autograd backward) under sync debug mode 'error'; "
                "results correct")

    return Check("cuda no host sync (set_sync_debug_mode)", fn, "cuda", estimate=3.0)


# --- CUDA graphs ---------------------------------------------------------------------------------

def _warm_up(step, iters=3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(iters):
            step()
    torch.cuda.current_stream().wait_stream(s)


def graph_check():
    def fn(ctx):
        import l2fast

        dev = _cuda()
        ref = refs.Reference()
        replays = 0
        mixed = (torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32)
        for n in (6, 1000):
            params = _tensor_set(n, dev, mixed)
            grads = [torch.zeros_like(p) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            fresh = [torch.empty_like(p) for p in params]
            gscale = torch.tensor(1.0, device=dev)

            def step():
                return (l2fast.l2_penalty_(params, WEIGHT),
                        torch.ops.l2fast.l2_penalty_(params, fresh, WEIGHT, list(range(n))),
                        torch.ops.l2fast.l2_penalty(params, WEIGHT),
                        torch.ops.l2fast.l2_penalty_backward(gscale, params, WEIGHT))

            _warm_up(step)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                v_acc, v_fresh, v_val, bgrads = step()
            for r in range(3):
                with torch.no_grad():  # new params, grads and upstream grad between replays
                    for i, (p, g) in enumerate(zip(params, grads)):
                        p.copy_(randn(p.shape, p.dtype, dev, 1000 * (r + 1) + i))
                        g.copy_(randn(p.shape, p.dtype, dev, 2000 * (r + 1) + i))
                        fresh[i].fill_(float("nan"))
                    gscale.fill_(0.5 + r)
                g_old = snapshot(grads)
                graph.replay()
                torch.cuda.synchronize()
                replays += 1
                expected = WEIGHT * ref.sq_norm(params)
                try:
                    for what, v in (("l2_penalty_", v_acc), ("l2_penalty_(fresh)", v_fresh), ("l2_penalty", v_val)):
                        check_value(what, v, expected, params, dev)
                    for i, p in enumerate(params):
                        check_grad_update(f"grads[{i}]", grads[i], g_old[i], p, 2 * WEIGHT, ref)
                        check_grad_update(f"fresh[{i}]", fresh[i], None, p, 2 * WEIGHT, ref)
                        check_grad_update(f"backward[{i}]", bgrads[i], None, p, 2 * WEIGHT * (0.5 + r), ref)
                except CheckFailed as e:
                    raise CheckFailed(f"{n} tensors, replay {r}: {e}") from None
            del graph
        return f"4 ops captured with 6 and 1,000 tensors; {replays} replays with new params each, all correct"

    return Check("cuda graph capture and replay", fn, "cuda", estimate=4.0)


def _host_stats():
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return {}
    keys = ("allocated_bytes.current", "active_bytes.current", "reserved_bytes.current")
    return {k: stats[k] for k in keys if k in stats}


def _internal():
    """torch.ops.l2fast_cuda: the CUDA build's pinned-pool counter and grid limit (multi_tensor.cu)."""
    ops = torch.ops.l2fast_cuda
    if not hasattr(ops, "pinned_table_bytes"):
        raise CheckFailed("torch.ops.l2fast_cuda.pinned_table_bytes is missing from this CUDA build")
    return ops


def _pool_in_use_after_release(ops, seconds=2.0):
    """The capture pool's bytes still held by graphs once destroyed graphs have returned theirs: a
    graph's user object is released on a driver thread, a little after the graph is destroyed."""
    deadline = time.monotonic() + seconds
    while ops.pinned_table_bytes(in_use=True) > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    return ops.pinned_table_bytes(in_use=True)


def captures_flat(step, n_captures, what):
    """Captures step() in a graph, replays it and drops the graph, n_captures times: device memory,
    torch's pinned host memory and l2fast's captured-table pool must stay flat, and every table a
    graph held must be back in the pool once the graphs are gone. step() must capture at least one
    device table (a list over the parameter table's size). Returns the check's detail."""
    dev = _cuda()
    ops = _internal()

    def capture_replay_drop():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        del out, graph

    def measure():
        torch.cuda.synchronize()
        gc.collect()
        held = _pool_in_use_after_release(ops)
        return torch.cuda.memory_allocated(dev), _host_stats(), ops.pinned_table_bytes(), held

    _warm_up(step)
    for _ in range(10):  # the allocators reach their steady state
        capture_replay_drop()
    dev0, host0, pool0, held0 = measure()
    for _ in range(n_captures):
        capture_replay_drop()
    dev1, host1, pool1, held1 = measure()
    slack = 64 << 10
    grew = []
    if dev1 - dev0 > slack:
        grew.append(f"device memory_allocated +{dev1 - dev0:,} B")
    grew += [f"torch pinned {k} +{host1[k] - host0[k]:,} B" for k in host0
             if k in host1 and host1[k] - host0[k] > slack]
    # A graph holds a few tables of 64-128 KiB; a few graphs may await their release while the next
    # captures run. Leaking them would add n_captures times that.
    if pool1 - pool0 > 16 * slack:
        grew.append(f"l2fast's captured-table pool +{pool1 - pool0:,} B")
    if held1 > held0:
        grew.append(f"{held1 - held0:,} B more of the pool held by graphs after every graph was destroyed")
    if pool0 == 0:
        grew.append("no captured table came from l2fast's pool (pinned_table_bytes() is 0)")
    if grew:
        raise CheckFailed(f"after {n_captures} capture/replay/drop cycles: {', '.join(grew)} "
                          "(expected flat: tables tied to the graph's life, not the process's)")
    pinned = (", torch pinned " + ", ".join(f"{k} {host1[k] - host0[k]:+,} B" for k in host0)) if host0 else \
        " (this torch has no host_memory_stats)"
    return (f"{n_captures} captures of {what}: device {dev1 - dev0:+,} B, captured-table "
            f"pool {pool0:,} B -> {pool1:,} B, all returned{pinned}")


def captures_memory_check(n_captures=200):
    """Tables of lists over 672 tensors captured in a graph come from l2fast's pinned pool and go back
    to it when the graph is destroyed; later captures reuse them. torch's host allocator, which held
    them before, never reuses a block recorded during capture: 200 captures grew by ~26 MB."""
    def fn(ctx):
        dev = _cuda()
        p6, p1k = _tensor_set(6, dev), _tensor_set(1000, dev)
        g6, g1k = [torch.zeros_like(p) for p in p6], [torch.zeros_like(p) for p in p1k]

        def step():
            ops = torch.ops.l2fast
            return (ops.l2_penalty_(p6, g6, WEIGHT, []), ops.l2_penalty_(p1k, g1k, WEIGHT, []),
                    ops.l2_penalty(p1k, WEIGHT))

        return captures_flat(step, n_captures, "6- and 1,000-tensor calls")

    return Check(f"cuda {n_captures} captures, memory flat", fn, "cuda", estimate=8.0)


# --- the host runs ahead of the GPU -----------------------------------------------------------------

def _sleep_cycles(seconds):
    """torch.cuda._sleep cycles that keep the GPU busy about `seconds` (measured, not assumed)."""
    probe = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return probe * seconds * 1000.0 / max(start.elapsed_time(end), 1e-3)


def host_ahead_check(sleep_s=0.05, n_calls=20):
    """torch's sync debug mode sees only the syncs torch instruments; a cudaHostAlloc or cudaFree
    that waits for the GPU goes unseen. Here the GPU sleeps ~50 ms first: calls that never wait for
    it return long before it wakes, and compute the right values once it does."""
    def fn(ctx):
        import l2fast

        dev = _cuda()
        ref = refs.Reference()
        sets = [_tensor_set(n, dev, refs.DTYPES[:1] + refs.DTYPES[2:], seed=n) for n in (6, 100, 1000)]
        for params in sets:
            for p in params:
                p.grad = torch.zeros_like(p)
        gout = torch.tensor(0.5, device=dev)
        steady = []  # (what, params, call): the same lists every call, as in a training loop
        for params in sets:
            pen = l2fast.L2Penalty(params, WEIGHT)
            steady += [("L2Penalty.add_grad_", params, pen.add_grad_),
                       ("sq_norm", params, lambda ps=params: l2fast.sq_norm(ps)),
                       ("l2_penalty", params, lambda ps=params: torch.ops.l2fast.l2_penalty(ps, WEIGHT))]
            if len(params) <= 672:  # new grads every call: beyond 672 tensors, a new table every call
                steady.append(("l2_penalty_backward", params,
                               lambda ps=params: torch.ops.l2fast.l2_penalty_backward(gout, ps, WEIGHT)))
        # The 1,000-tensor list in a new order every call: a new device table each time, staged
        # through a pinned block while the GPU still holds the earlier ones.
        big = sets[2]
        changing = []
        for k in range(n_calls):
            order = torch.randperm(len(big), generator=torch.Generator().manual_seed(k)).tolist()
            ps, gs = [big[i] for i in order], [big[i].grad for i in order]
            changing.append(("l2_penalty_ (a new table)", ps,
                             lambda ps=ps, gs=gs: torch.ops.l2fast.l2_penalty_(ps, gs, WEIGHT, [])))
        for _, _, call in steady + changing[:2]:  # warm-up: modules, allocators, the steady tables
            call()
        torch.cuda.synchronize()
        per_second = _sleep_cycles(1.0)
        lines, worst = [], 0.0
        for what, calls in (("steady lists (6, 100, 1,000 tensors)", steady), ("a new 1,000-tensor table per call",
                                                                               changing)):
            calls = (calls * n_calls)[:max(n_calls, len(calls))]
            t0 = time.perf_counter()  # the calls' own host time, the GPU idle
            for _, _, call in calls:
                call()
            plain_s = time.perf_counter() - t0
            torch.cuda.synchronize()
            # A call that waits for the GPU waits out most of the sleep: make the sleep long enough
            # that half of it is far more than the calls' own time.
            sleep = max(sleep_s, 5 * plain_s)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(int(per_second * sleep))
            t0 = time.perf_counter()
            outs = [call() for _, _, call in calls]
            host_s = time.perf_counter() - t0
            end.record()
            gpu_busy = not end.query()
            end.synchronize()
            lines.append(f"{what}: {len(calls)} calls returned in {host_s * 1e3:.2f} ms ({plain_s * 1e3:.2f} ms with "
                         f"the GPU idle); the GPU finished {start.elapsed_time(end):.1f} ms after its "
                         f"{sleep * 1e3:.0f} ms sleep was queued")
            if not gpu_busy or host_s > sleep / 2:
                raise CheckFailed(f"{what}: {len(calls)} calls took {host_s * 1e3:.1f} ms of host time behind a "
                                  f"{sleep * 1e3:.0f} ms GPU sleep ({plain_s * 1e3:.1f} ms with the GPU idle; the "
                                  f"GPU was {'still busy' if gpu_busy else 'done'} after them): a call waited for "
                                  "the GPU", output="\n".join(lines))
            for (name, params, _), out in zip(calls, outs):  # computed right while the host ran ahead
                if name == "l2_penalty_backward":
                    for i, (p, g) in enumerate(zip(params, out)):
                        worst = max(worst, check_grad_update(f"{name}[{i}]", g, None, p, 2 * WEIGHT * 0.5, ref))
                else:
                    expected = ref.sq_norm(params) * (1.0 if name == "sq_norm" else WEIGHT)
                    worst = max(worst, check_value(name, out, expected, params, dev))
        return (f"{n_calls}+ calls returned before a sleeping GPU woke, steady and with a new table each call; "
                f"values right (worst {worst:.2f} of tolerance)", "\n".join(lines))

    return Check("cuda host returns before the GPU (timed)", fn, "cuda", estimate=3.0)


# --- numerics and determinism ------------------------------------------------------------------------

def accuracy_check():
    """Constant values are the worst case for float32 running sums (every add rounds the same way):
    the README promises 1e-6 relative at every size, up to 10^8 values."""
    def fn(ctx):
        import l2fast

        dev = _cuda()
        cases = [(torch.float32, n, v) for n in (16_384, 1_000_003, 10**8) for v in (0.5025, 1 / 3, 7.77)]
        cases += [(dt, 3_000_017, 0.5025) for dt in (torch.float16, torch.bfloat16)]
        worst = 0.0
        for dtype, n, v in cases:
            x = torch.full((n,), v, device=dev, dtype=dtype)
            expected = refs.exact_constant_sq_norm(v, n, dtype)
            for what, got in (("sq_norm", l2fast.sq_norm([x])), ("l2_penalty", l2fast.l2_penalty([x], 1.0))):
                err = abs(got.item() - expected) / expected
                if not err <= 1e-6:
                    raise CheckFailed(f"{what} of {n:,} {refs.dtype_name(dtype)} values all {v!r}: {got.item()!r}, "
                                      f"exactly {expected!r} (relative error {err:.2e} > 1e-6)")
                worst = max(worst, err)
            del x
        return f"{len(cases)} constant tensors up to 10^8 values (float32, float16, bfloat16): worst relative error {worst:.1e}"

    return Check("cuda accuracy on constant values", fn, "cuda", estimate=3.0)


def scales_check():
    """Grad scales float32 cannot hold: zero params keep zero grads, products float32
    can hold come out right, and scales float64 cannot hold are refused before any write."""
    def fn(ctx):
        dev = _cuda()
        ops = torch.ops.l2fast
        cases = [(torch.float32, [0.0, 1e-30, -2e-30], 1e39), (torch.bfloat16, [0.0, 1e-30, -2e-30], 1e39),
                 (torch.float32, [1e30, 0.0, -3e25, 7.0], 1e-45), (torch.float16, [0.0, 1.0, -1.0], 1e39),
                 (torch.float64, [0.0, 1e-300, -1.0], 8e307)]
        for dtype, values, weight in cases:
            p = torch.tensor(values, dtype=dtype, device=dev)
            for fresh in (True, False):
                g = torch.full_like(p, 0.0 if fresh else 3.0)
                ops.l2_penalty_([p], [g], weight, [0] if fresh else [])
                exact = 2 * weight * p.double() + (0.0 if fresh else 3.0)
                expected = exact.to(dtype).double()  # inf where the grad's dtype cannot hold it
                got = g.double()
                tol = refs.grad_tolerance(dtype, exact.abs())
                finite = expected.isfinite()
                bad = torch.where(finite, ~((got - exact).abs() <= tol), got != expected)
                if bool(bad.any()) or bool((got[p == 0] != (0.0 if fresh else 3.0)).any()):
                    raise CheckFailed(f"{refs.dtype_name(dtype)} {values} with weight {weight:g} "
                                      f"({'fresh' if fresh else 'accumulated into 3'}): grads {got.tolist()}, "
                                      f"expected {expected.tolist()}")
        p = [torch.tensor([0.0, 1.0], dtype=torch.float64, device=dev)]
        for weight, weights in ((1e308, None), (1e200, [1e200])):
            g = [torch.full_like(p[0], 3.0)]
            try:
                ops.l2_penalty_(p, g, weight, [], weights)
            except (ValueError, RuntimeError) as e:
                if "overflows float64" not in str(e):
                    raise CheckFailed(f"weight {weight:g}, weights {weights}: refused without the reason: {e}") from None
            else:
                raise CheckFailed(f"weight {weight:g}, weights {weights}: accepted; 2·weight·weights[0] overflows "
                                  "float64 and must be refused")
            if not bool((g[0] == 3.0).all()):
                raise CheckFailed(f"weight {weight:g}: a refused call wrote into the grad")
        return f"{len(cases)} scales beyond or below float32's range exact in both modes; 2 overflowing scales refused"

    return Check("cuda grad scales beyond float32", fn, "cuda", estimate=1.0)


def bits_check():
    """The bits depend on the values and the list, not on the grid (set by the GPU's SM count and
    occupancy, here forced to 1..97 blocks) nor on where the tensors sit (every offset within 16
    bytes, for params and grads, so 16-byte and element loads both run)."""
    def fn(ctx):
        ops = torch.ops.l2fast
        internal = _internal()
        dev = _cuda()
        shapes = [((3_000_001,), torch.float32), ((70_001,), torch.float16), ((1025,), torch.bfloat16),
                  ((5,), torch.float32)] + [((1 + k % 50,), torch.float32) for k in range(700)]
        values = [refs.randn(s, dt, "cpu", 300 + i) for i, (s, dt) in enumerate(shapes)]
        olds = [refs.randn(s, dt, "cpu", 600 + i) for i, (s, dt) in enumerate(shapes)]
        values64 = [v.double() for v in values[:3]]
        olds64 = [o.double() for o in olds[:3]]

        def run(vals, olds_, p_off, g_off):
            params, grads = [placed(t, p_off, dev) for t in vals], [placed(t, g_off, dev) for t in olds_]
            fresh = [g.clone() for g in grads]
            out = [ops.l2_penalty_(params, grads, WEIGHT, []),
                   ops.l2_penalty_(params, fresh, WEIGHT, list(range(len(fresh)))),
                   ops.sq_norm(params)]
            out += ops.l2_penalty_backward(torch.tensor(0.3, device=dev), params, WEIGHT)
            return [t.cpu() for t in out + grads + fresh]

        grids, offsets = (0, 1, 2, 7, 97), range(0, 9)
        for name, vals, olds_ in (("float32-accumulated list", values, olds), ("float64 list", values64, olds64)):
            base = run(vals, olds_, 0, 0)
            for limit in grids:
                with grid_limit(internal, limit):
                    got = run(vals, olds_, 0, 0)
                if not refs.all_bit_equal(base, got):
                    raise CheckFailed(f"{name}: a grid of at most {limit} blocks changed the bits")
            for p_off in offsets:
                g_off = (3 * p_off + 1) % 9
                if not refs.all_bit_equal(base, run(vals, olds_, p_off, g_off)):
                    raise CheckFailed(f"{name}: params at element offset {p_off}, grads at {g_off} changed the bits")
        return (f"2 lists (704 mixed tensors, a device table; 3 float64): bit-identical values and grads over grids of 1..97 blocks and "
                f"{len(offsets)} param/grad offsets")

    return Check("cuda bits independent of grid and alignment", fn, "cuda", estimate=4.0)


def table_sizes_check():
    """Every table size the launch picks (32, 64, 128, 256, 672 entries by value; a device table
    beyond), at each boundary, against float64 — and the launched kernel is the expected one."""
    def fn(ctx):
        from torch.profiler import ProfilerActivity, profile

        dev = _cuda()
        ref = refs.Reference()
        worst, names = 0.0, []
        dtypes = refs.DTYPES[:1] + refs.DTYPES[2:]
        for n in (31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 671, 672, 673, 1500):
            # none empty: an empty tensor has no entry, and the table size is what is checked
            params = [randn((1 + (7 * i) % 699,), dtypes[i % 3], dev, 7 * n + i) for i in range(n)]
            grads = [randn(p.shape, p.dtype, dev, 11 * n + i) for i, p in enumerate(params)]
            g_old = snapshot(grads)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                value = torch.ops.l2fast.l2_penalty_(params, grads, WEIGHT, [0])
                torch.cuda.synchronize()
            table = launched_table(prof, "l2_penalty_kernel", (32, 64, 128, 256, 672), n)
            names.append(f"{n}: {table or 'no kernel name recorded'}")
            try:
                worst = max(worst, check_value("l2_penalty_", value, WEIGHT * ref.sq_norm(params), params, dev))
                for i, (p, g, g0) in enumerate(zip(params, grads, g_old)):
                    worst = max(worst, check_grad_update(f"grads[{i}]", g, None if i == 0 else g0, p, 2 * WEIGHT, ref))
            except CheckFailed as e:
                raise CheckFailed(f"{n} tensors: {e}") from None
        return f"16 list lengths 31..1,500 across every table size: right values and grads (worst {worst:.2f})", \
            "\n".join(names)

    return Check("cuda every table size", fn, "cuda", estimate=5.0)


# --- streams x threads ---------------------------------------------------------------------------

class _Lane:
    """One stream's independent work: params, grads and a record of every call's value."""

    def __init__(self, k, dev, calls):
        sets = [
            [randn((2_000_003,), torch.float32, dev, 10 * k), randn((700,), torch.float16, dev, 10 * k + 1),
             randn((33, 65), torch.bfloat16, dev, 10 * k + 2)],
            _tensor_set(6, dev, seed=100 * k),
            _tensor_set(1000, dev, refs.DTYPES[:1] + refs.DTYPES[2:], seed=100 * k),
            [randn((16385,), torch.float64, dev, 10 * k), randn((300, 40), torch.float32, dev, 10 * k + 1).t()],
        ]
        self.params = sets[k % len(sets)]
        self.grads = [randn(p.shape, p.dtype, dev, 500 + i) for i, p in enumerate(self.params)]
        self.fresh = [torch.zeros_like(p) for p in self.params]
        self.values = torch.zeros(2 * calls, dtype=torch.float64, device=dev)
        self.calls = calls

    def clone(self):
        other = object.__new__(_Lane)
        other.params = [p.clone() for p in self.params]
        other.grads = [g.clone() for g in self.grads]
        other.fresh = [f.clone() for f in self.fresh]
        other.values = self.values.clone()
        other.calls = self.calls
        return other

    def step(self, i):
        ops = torch.ops.l2fast
        self.values[2 * i].copy_(ops.l2_penalty_(self.params, self.grads, WEIGHT, []))
        self.values[2 * i + 1].copy_(ops.l2_penalty_(self.params, self.fresh, WEIGHT, list(range(len(self.fresh)))))
        torch._foreach_mul_(self.params, 0.999)  # every call sees different values

    def outputs(self):
        return [self.values, *self.params, *self.grads, *self.fresh]


def streams_threads_check():
    def fn(ctx):
        dev = _cuda()
        calls = 500 if ctx.quick else 2000
        lanes = [_Lane(k, dev, calls) for k in range(4)]
        serial = [lane.clone() for lane in lanes]
        torch.cuda.synchronize()
        for lane in serial:  # the reference: one stream, one thread, in order
            for i in range(calls):
                lane.step(i)
        torch.cuda.synchronize()

        streams = [torch.cuda.Stream() for _ in lanes]
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        errors = []

        def worker(mine):  # two lanes per thread, each on its own stream, calls interleaved
            try:
                torch.cuda.set_device(dev)
                for i in range(calls):
                    for k in mine:
                        with torch.cuda.stream(streams[k]):
                            lanes[k].step(i)
            except Exception as e:  # noqa: BLE001 - reported as the check's failure
                errors.append(e)

        threads = [threading.Thread(target=worker, args=([0, 1],)), threading.Thread(target=worker, args=([2, 3],))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        if any(t.is_alive() for t in threads):
            raise CheckFailed("the worker threads did not finish within 600 s")
        if errors:
            raise errors[0]
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        for k, (lane, ref) in enumerate(zip(lanes, serial)):
            for j, (a, b) in enumerate(zip(lane.outputs(), ref.outputs())):
                if not refs.bit_equal(a, b):
                    where = "values" if j == 0 else f"tensor {j}"
                    raise CheckFailed(f"lane {k} ({len(lane.params)} tensors): {where} differ from the serial run")
        return (f"2 threads x 2 streams x {2 * calls:,} un-synchronised calls each ({8 * calls:,} in all; "
                "1 big, 6, 1,000 and float64/strided tensors): bit-identical to a serial run")

    return Check("cuda 2 streams x 2 threads, bit-identical", fn, "cuda", estimate=12.0)


# --- > 2^31 elements -----------------------------------------------------------------------------

def huge_check():
    def fn(ctx):
        import l2fast

        dev = _cuda()
        n = 2**31 + 2**20 + 3
        need = 2 * 4 * n + (6 << 30)  # params and grads in float32, plus the reference's float64 pieces
        torch.cuda.empty_cache()  # what earlier checks left cached counts as free
        free, _ = torch.cuda.mem_get_info(dev)
        if free < need:
            raise Skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
        gen = torch.Generator(device=dev).manual_seed(0)
        p = torch.empty(n, device=dev).uniform_(-1, 1, generator=gen)
        p[-4099:] = 3.0  # beyond index 2^31: a lost tail would show in the value
        g = torch.full((n,), 0.25, device=dev)
        try:
            value = torch.ops.l2fast.l2_penalty_([p], [g], WEIGHT, [])
            total = torch.zeros((), dtype=torch.float64, device=dev)
            step = 1 << 27
            for s in range(0, n, step):
                total += (p[s:s + step].double() ** 2).sum()
            ref = total.item()
            check_value("l2_penalty_ over 2^31+ elements", value, WEIGHT * ref, [p], dev)
            check_value("sq_norm over 2^31+ elements", l2fast.sq_norm([p]), ref, [p], dev)
            worst = 0.0
            for s in range(0, n, step):
                pc = p[s:s + step]
                expected = 0.25 + 2 * WEIGHT * pc.double()
                bound = 0.25 + (2 * WEIGHT * pc.double()).abs()
                try:
                    worst = max(worst, check_grad("grad", g[s:s + step], expected, bound, p.dtype, pc.shape))
                except CheckFailed as e:
                    raise CheckFailed(f"grad from element {s:,}: {e}") from None
        finally:
            del p, g
            torch.cuda.empty_cache()
        return f"one float32 tensor of {n:,} elements: value, sq_norm and grad correct (worst {worst:.2f} of tolerance)"

    return Check("cuda more than 2^31 elements", fn, "cuda", estimate=10.0)


def checks():
    return [one_launch_check(), table_sizes_check(), no_sync_check(), host_ahead_check(), graph_check(),
            captures_memory_check(), bits_check(), accuracy_check(), scales_check(), streams_threads_check(),
            huge_check()]
