"""CUDA-only checks, in process: one launch per call, no host sync, CUDA graphs, memory across
captures, streams x threads, and a tensor of more than 2^31 elements."""
import gc
import threading

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

def _device_events(prof):
    from torch.autograd import DeviceType

    kernels, other = [], []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        kind = getattr(e, "activity_type", None) or ""
        if e.name.startswith(("Memcpy", "Memset")) or "memcpy" in kind or "memset" in kind:
            other.append(e.name)
        else:
            kernels.append(e.name)
    return kernels, other


def one_launch_check():
    def fn(ctx):
        from torch.profiler import ProfilerActivity, profile

        dev = _cuda()
        calls_per_op = 5
        lines, seen_any, copies_total = [], False, 0
        for n in (6, 1000):
            params = _tensor_set(n, dev)
            grads = [torch.randn_like(p) for p in params]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            for name, call in _calls(params, grads, dev).items():
                for _ in range(3):  # warm-up: lazy module loading, allocator
                    call()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls_per_op):
                        call()
                    torch.cuda.synchronize()
                kernels, copies = _device_events(prof)
                seen_any = seen_any or bool(kernels or copies)
                copies_total += len(copies)
                if seen_any and len(kernels) != calls_per_op:
                    raise CheckFailed(f"{name} on {n} tensors: {len(kernels)} kernels in {calls_per_op} calls "
                                      f"({sorted(set(kernels))}); expected exactly one per call")
                lines.append(f"{name} x{n}: {len(kernels) // calls_per_op} kernel, "
                             f"{len(copies) // calls_per_op} copies/call")
        if not seen_any:
            raise Skip("the profiler recorded no CUDA activity (is CUPTI available?)")
        copies = "no memcpy/memset" if copies_total == 0 else f"{copies_total} memcpy/memset in all (see output)"
        return (f"exactly 1 kernel per call for {len(lines) // 2} call kinds x (6, 1,000) tensors; {copies}",
                "\n".join(lines))

    return Check("cuda one kernel launch per call (profiler)", fn, "cuda")


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
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs = []
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
        except RuntimeError as e:
            raise CheckFailed(f"a host sync happened: {' '.join(str(e).split())[:300]}") from None
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        worst = 0.0
        for (params, _, leaves), v, g0 in zip(work, outs, g_old):
            worst = max(worst, check_value("l2_penalty_", v, WEIGHT * ref.sq_norm(params), params, dev))
            for i, (p, old, leaf) in enumerate(zip(params, g0, leaves)):
                worst = max(worst, check_grad_update(f"params[{i}].grad", p.grad, old, p, 2 * WEIGHT, ref))
                worst = max(worst, check_grad_update(f"leaves[{i}].grad", leaf.grad, None, p, 6 * WEIGHT, ref))
        return (f"{n} calls (6 and 1,000 tensors, every op, autograd backward) under sync debug mode 'error'; "
                "results correct")

    return Check("cuda no host sync (set_sync_debug_mode)", fn, "cuda")


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

    return Check("cuda graph capture and replay", fn, "cuda")


def _host_stats():
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return {}
    keys = ("allocated_bytes.current", "active_bytes.current", "reserved_bytes.current")
    return {k: stats[k] for k in keys if k in stats}


def captures_memory_check(n_captures=200):
    def fn(ctx):
        dev = _cuda()
        p6, p1k = _tensor_set(6, dev), _tensor_set(1000, dev)
        g6, g1k = [torch.zeros_like(p) for p in p6], [torch.zeros_like(p) for p in p1k]

        def step():
            ops = torch.ops.l2fast
            return (ops.l2_penalty_(p6, g6, WEIGHT, []), ops.l2_penalty_(p1k, g1k, WEIGHT, []),
                    ops.l2_penalty(p1k, WEIGHT))

        def capture_replay_drop():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            graph.replay()
            del out, graph

        def measure():
            torch.cuda.synchronize()
            gc.collect()
            return torch.cuda.memory_allocated(dev), _host_stats()

        _warm_up(step)
        for _ in range(10):  # the allocators reach their steady state
            capture_replay_drop()
        dev0, host0 = measure()
        for _ in range(n_captures):
            capture_replay_drop()
        dev1, host1 = measure()
        slack = 64 << 10
        grew = []
        if dev1 - dev0 > slack:
            grew.append(f"device memory_allocated +{dev1 - dev0:,} B")
        grew += [f"pinned {k} +{host1[k] - host0[k]:,} B" for k in host0 if k in host1 and host1[k] - host0[k] > slack]
        if grew:
            raise CheckFailed(f"after {n_captures} capture/replay/drop cycles: {', '.join(grew)} "
                              "(expected flat: tables tied to the graph's life, not the process's)")
        pinned = (", pinned " + ", ".join(f"{k} {host1[k] - host0[k]:+,} B" for k in host0)) if host0 else \
            " (this torch has no host_memory_stats: pinned memory not measured)"
        return f"{n_captures} captures of 6- and 1,000-tensor calls: device {dev1 - dev0:+,} B{pinned}"

    return Check(f"cuda {n_captures} captures, memory flat", fn, "cuda")


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

    return Check("cuda 2 streams x 2 threads, bit-identical", fn, "cuda")


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

    return Check("cuda more than 2^31 elements", fn, "cuda")


def checks():
    return [one_launch_check(), no_sync_check(), graph_check(), captures_memory_check(), streams_threads_check(),
            huge_check()]
