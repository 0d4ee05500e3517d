"""Checks of l2fast.optim.AdamW (the penalty inside the AdamW step): every step against float64, parity
with torch's fused AdamW, GradScaler's inf skip, determinism; on CUDA one launch per step (every table
size), no host sync, CUDA-graph capture and replay, 200 captures with memory flat, bits independent of
the grid and alignment, the value's accuracy on constant values, and the bandwidth at 1e8 values (a
benchmark)."""
import math

import torch

from . import refs
from .checks_cuda import (_cuda, _device_events, _internal, _tensor_set, _warm_up, captures_flat, grid_limit,
                          launched_table, no_host_sync, placed)
from .refs import check_value, randn
from .runner import Check, CheckFailed, Skip

LR = 1e-2
# Relative tolerance of a stored param/moment against float64, by dtype: the float arithmetic of a
# step is a few roundings of the opmath type, then one rounding to the stored dtype.
STEP_RTOL = {torch.float32: 2e-6, torch.float64: 1e-14, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MAX_ULPS = 4  # l2_weight 0 against torch's fused AdamW, where the order of operations differs


def adamw_reference(p, g, m, v, vmax, step, *, lr, betas, eps, weight_decay, l2_weight, amsgrad, maximize,
                    grad_scale=None):
    """One step in float64 from the given values (any dtype), in torch's order: g / grad_scale, negated
    with maximize, plus 2·w·p of the old p; decoupled decay; moments; bias corrections of step `step`.
    Returns (p, m, v, vmax or None, w·‖p_old‖², bounds): bounds[k] is, per element, the size of the terms
    that k sums (no cancellation can hide an error against it). g None: no data gradient."""
    p, m, v = p.double(), m.double(), v.double()
    g = torch.zeros_like(p) if g is None else g.double()
    if grad_scale is not None:
        g = g / grad_scale
    if maximize:
        g = -g
    pen = 2 * l2_weight * p
    size = g.abs() + pen.abs()  # g and 2·w·p may cancel: an error in either is relative to its own size
    g = g + pen
    b1, b2 = betas
    bounds = {"m": (b1 * m).abs() + (1 - b1) * size, "v": b2 * v + (1 - b2) * size * size}
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    vmax = torch.maximum(vmax.double(), v) if amsgrad else None
    denom = (vmax if amsgrad else v).sqrt() / math.sqrt(bc2) + eps
    update = lr / bc1 * m / denom
    bounds["p"] = (p * (1 - lr * weight_decay)).abs() + update.abs()
    return p * (1 - lr * weight_decay) - update, m, v, vmax, l2_weight * (p * p).sum().item(), bounds


def close_to(what, got, want, dtype, bound):
    """`got` (stored in dtype) within STEP_RTOL of float64 `want`, relative to `bound` (the size of the terms
    summed into it, per element or one number)."""
    fin = torch.finfo(dtype)
    tol = STEP_RTOL[dtype] * bound + 2 * fin.tiny * fin.eps  # + the spacing of subnormals
    bad = ~((got.double() - want).abs() <= tol)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise CheckFailed(f"{what}: element {i} is {got.double().flatten()[i].item()!r}; the float64 reference is "
                          f"{want.flatten()[i].item()!r} ({int(bad.sum()):,} of {got.numel():,} elements off)")


def _state(shape, dtype, device, seed, amsgrad):
    """(p, g, m, v, vmax) of a param several steps in: seeded, drawn on the CPU."""
    p = randn(shape, dtype, device, seed)
    g = (randn(shape, torch.float64, "cpu", seed + 1) * 1e-2).to(dtype=dtype, device=device)
    m = (randn(shape, torch.float64, "cpu", seed + 2) * 1e-3).to(dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(seed + 3)
    v = (torch.rand(shape, generator=gen, dtype=torch.float64) * 1e-4).to(dtype=dtype, device=device)
    vmax = (v.double() * 1.5).to(dtype) if amsgrad else None
    return p, g, m, v, vmax


def param_group(params, hyper):
    """An AdamW param group of `params` with the hyperparameters `hyper`, whose `l2_weight` is the
    group's "weight"."""
    return {"params": list(params), "weight": hyper["l2_weight"],
            **{key: x for key, x in hyper.items() if key != "l2_weight"}}


def _optimizer(groups, device, start, states, cls=None, **kwargs):
    """An l2fast.optim.AdamW (or `cls`) over `groups` whose params' state is `states` (a list per param, in order)."""
    from ..optim import AdamW

    opt = (cls or AdamW)(groups, **kwargs)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    for p, (m, v, vmax) in zip(params, states):
        if m is None:
            continue
        st = opt.state[p]
        st.update(step=torch.tensor(float(start), device=device), exp_avg=m.clone(), exp_avg_sq=v.clone())
        if vmax is not None:
            st["max_exp_avg_sq"] = vmax.clone()
    return opt, params


# --- every step against float64 ------------------------------------------------------------------

def _check_step(opt, cases, hyper, step, what, device):
    """After step `step` of `opt`: every param and its state against float64 (cases: (param, group,
    p, g, m, v, vmax) as they were before the step), and the penalty. Returns the penalty's error as a
    fraction of its tolerance."""
    total = 0.0
    for param, k, p, g, m, v, vmax in cases:
        want = adamw_reference(p, g, m, v, vmax, step, **hyper[k])
        total += want[4]
        st = opt.state[param]
        where = f"{what}: {refs.dtype_name(p.dtype)} {list(p.shape)} group {k}"
        bounds = want[5]
        close_to(f"{where} param", param.detach(), want[0], p.dtype, bounds["p"])
        close_to(f"{where} exp_avg", st["exp_avg"], want[1], p.dtype, bounds["m"])
        close_to(f"{where} exp_avg_sq", st["exp_avg_sq"], want[2], p.dtype, bounds["v"])
        if want[3] is not None:
            close_to(f"{where} max_exp_avg_sq", st["max_exp_avg_sq"], want[3], p.dtype, want[3].abs())
        if st["step"].item() != step or (param.grad is None) != (g is None):
            raise CheckFailed(f"{where}: step {st['step'].item()} (expected {step}), grad "
                              f"{'missing' if param.grad is None else 'present'}")
    return check_value(f"{what} penalty", opt.penalty, total, [c[0] for c in cases], device)


def values_check(device):
    def fn(ctx):
        dev = torch.device(device)
        sizes = [0, 1, 31, 4097, 70_001] if ctx.quick else [0, 1, 7, 31, 1023, 4097, 16385, 70_001, 300_007]
        hyper = [dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, l2_weight=0.37, amsgrad=False,
                      maximize=False),
                 dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, l2_weight=0.0, amsgrad=True,
                      maximize=True),
                 dict(lr=1e-3, betas=(0.95, 0.9), eps=1e-8, weight_decay=0.01, l2_weight=1.5, amsgrad=True,
                      maximize=False)]
        worst, checked = 0, 0
        for dtype in refs.DTYPES:
            groups = [param_group([], h) for h in hyper]
            cases = []
            for i, n in enumerate(sizes + [(5, 3)]):  # the last: a transposed (non-dense-like) param
                k = i % len(hyper)
                shape = n if isinstance(n, tuple) else (n,)
                p, g, m, v, vmax = _state(shape, dtype, dev, 100 * i, hyper[k]["amsgrad"])
                param = torch.nn.Parameter(p.clone().t().contiguous().t() if len(shape) == 2 else p.clone())
                drop = i == 2 and hyper[k]["l2_weight"] != 0  # no data grad: the penalty's gradient alone
                param.grad = None if drop else g.clone()
                groups[k]["params"].append(param)
                cases.append((param, k, p, None if drop else g, m, v, vmax))
            order = [c for k in range(len(hyper)) for c in cases if c[1] == k]
            opt, _ = _optimizer(groups, dev, 4, [(m, v, vmax) for _, _, _, _, m, v, vmax in order])
            opt.step()
            checked += len(order)
            worst = max(worst, _check_step(opt, order, hyper, 5, f"{refs.dtype_name(dtype)} list", dev))
        return f"{checked} params (4 dtypes, 3 groups: amsgrad, maximize, decay, L2 weights, a missing grad) " \
               f"against float64; penalty within {worst:.2f} of its tolerance"

    return Check(f"{device} optim AdamW step vs float64", fn, device)


# --- parity with torch's fused AdamW -------------------------------------------------------------

def ulps(a, b):
    """Largest distance in units in the last place between same-dtype tensors (sign changes count big)."""
    if a.numel() == 0:
        return 0
    ia, ib = refs._bits(a), refs._bits(b)
    same_sign = (a >= 0) == (b >= 0)
    d = (ia.long() - ib.long()).abs()
    d = torch.where(same_sign | (a == b), d, torch.full_like(d, 2 ** 30))
    return int(d.max())


def torch_parity_check(device):
    def fn(ctx):
        dev = torch.device(device)
        n = 4096 * 3 + 13  # vector code and a scalar tail in torch's CPU kernel
        worst, identical, total = 0, 0, 0
        for dtype in refs.DTYPES:
            for amsgrad in (False, True):
                for maximize in (False, True):
                    p, g, m, v, vmax = _state((n,), dtype, dev, 7, amsgrad)
                    kwargs = dict(lr=LR, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
                    ours, theirs = torch.nn.Parameter(p.clone()), torch.nn.Parameter(p.clone())
                    results = []
                    for param, extra in ((ours, {}), (theirs, dict(cls=torch.optim.AdamW, fused=True))):
                        param.grad = g.clone()
                        opt, _ = _optimizer([param], dev, 2, [(m, v, vmax)], **extra, **kwargs)
                        opt.step()
                        st = opt.state[param]
                        results.append([param.detach(), st["exp_avg"], st["exp_avg_sq"]]
                                       + ([st["max_exp_avg_sq"]] if amsgrad else []))
                    for a, b in zip(*results):
                        worst = max(worst, ulps(a, b))
                        identical += int((a == b).sum())
                        total += a.numel()
        detail = f"l2_weight 0: {identical / total:.4%} of values bit-identical to torch.optim.AdamW(fused=True), " \
                 f"largest difference {worst} ulp (4 dtypes x amsgrad x maximize)"
        if worst > MAX_ULPS:
            raise CheckFailed(detail + f"; expected at most {MAX_ULPS}")
        return detail

    return Check(f"{device} optim parity with torch fused AdamW", fn, device)


# --- GradScaler: unscale in the step, skip it on an inf ------------------------------------------

def grad_scaler_check(device):
    def fn(ctx):
        dev = torch.device(device)
        hyper = dict(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, l2_weight=0.25, amsgrad=True,
                     maximize=False)
        p, g, m, v, vmax = _state((1000,), torch.float32, dev, 3, True)
        param = torch.nn.Parameter(p.clone())
        param.grad = g * 1024
        opt, _ = _optimizer([param], dev, 1, [(m, v, vmax)], **hyper)
        before = refs.snapshot([param, param.grad, *opt.state[param].values()])
        opt.grad_scale = torch.tensor(1024.0, device=dev)
        opt.found_inf = torch.tensor(1.0, device=dev)
        opt.step()
        refs.check_unchanged("found_inf 1: param, grad and state", [param, param.grad, *opt.state[param].values()],
                             before)
        check_value("penalty with found_inf 1", opt.penalty, 0.25 * (p.double() ** 2).sum().item(), [param], dev)
        opt.found_inf = torch.tensor(0.0, device=dev)
        opt.step()
        want = adamw_reference(p, g * 1024, m, v, vmax, 2, grad_scale=1024.0, **hyper)
        close_to("found_inf 0: param", param.detach(), want[0], torch.float32, want[5]["p"])
        close_to("found_inf 0: the unscaled grad written back", param.grad, g.double(), torch.float32, g.double().abs())
        return "found_inf 1: nothing written, the penalty reported; found_inf 0: unscaled in the step, as float64"

    return Check(f"{device} optim GradScaler inf skip", fn, device)


# --- determinism -----------------------------------------------------------------------------------

def determinism_check(device):
    def fn(ctx):
        from ..optim import AdamW

        dev = torch.device(device)
        sizes = [1_000_003 if ctx.quick else 3_000_001, 5, 70_000, 8191, 8193, 0, 33]

        def once():
            params = [torch.nn.Parameter(randn((n,), refs.DTYPES[i % 4], dev, i)) for i, n in enumerate(sizes)]
            for i, param in enumerate(params):
                param.grad = randn(param.shape, param.dtype, dev, 50 + i)
            opt = AdamW(params, lr=LR, l2_weight=0.37, amsgrad=True)
            for _ in range(2):
                opt.step()
            return [opt.penalty] + [param.detach() for param in params]

        runs, threads = refs.identical_runs(once, dev, 2)
        return f"{len(runs)} runs of 2 steps over {sum(sizes):,} values in 4 dtypes bit-identical{threads}"

    return Check(f"{device} optim determinism", fn, device)


# --- CUDA: one launch, no host sync, graphs, bandwidth -----------------------------------------------

def _model_params(n, device, seed=0):
    """n=6: the seed MLP's shapes; else n tensors of 0..699 elements. Grads set; state made by one step."""

    params = [torch.nn.Parameter(t) for t in _tensor_set(n, device, seed=seed)]
    for i, param in enumerate(params):
        param.grad = randn(param.shape, param.dtype, device, 500 + i)
    return params


def one_launch_check():
    def fn(ctx):
        from torch.profiler import ProfilerActivity, profile

        from ..optim import AdamW

        dev, steps, lines = _cuda(), 5, []
        for n in (6, 1000):
            for scaled in (False, True):
                params = _model_params(n, dev)
                opt = AdamW(params, lr=LR, l2_weight=0.37, amsgrad=n == 1000)
                if scaled:
                    opt.grad_scale, opt.found_inf = torch.tensor(1.0, device=dev), torch.tensor(0.0, device=dev)
                for _ in range(3):  # state made, module loaded
                    opt.step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        opt.step()
                    torch.cuda.synchronize()
                kernels, copies, sets = _device_events(prof)
                copies += sets
                if not kernels and not copies:
                    raise Skip("the profiler recorded no CUDA activity (is CUPTI available?)")
                if len(kernels) != steps:
                    raise CheckFailed(f"{n} tensors{' with grad_scale' if scaled else ''}: {len(kernels)} kernels "
                                      f"in {steps} steps ({sorted(set(kernels))}); expected exactly one per step")
                lines.append(f"{n} tensors{', grad_scale/found_inf' if scaled else ''}: 1 kernel, "
                             f"{len(copies) // steps} memcpy/memset per step")
        return "exactly 1 kernel per step() for 6 and 1,000 tensors, with and without GradScaler", "\n".join(lines)

    return Check("cuda optim one kernel launch per step (profiler)", fn, "cuda")


def no_sync_check():
    def fn(ctx):
        from ..optim import AdamW

        dev = _cuda()
        work = []
        for n in (6, 1000):
            params = _model_params(n, dev)
            lr = torch.tensor(LR, device=dev)
            opt = AdamW(params, lr=lr, l2_weight=0.37, capturable=True)
            opt.grad_scale, opt.found_inf = torch.tensor(2.0, device=dev), torch.tensor(0.0, device=dev)
            opt.step()  # state made before the mode is set
            work.append(opt)
        torch.cuda.synchronize()
        with no_host_sync():
            for opt in work:
                for _ in range(3):
                    opt.step()
        for opt in work:
            if not all(opt.state[p]["step"].item() == 4 for g in opt.param_groups for p in g["params"]):
                raise CheckFailed("the steps did not advance to 4")
        return "12 steps (6 and 1,000 tensors, lr a device tensor, grad_scale/found_inf) under sync debug mode 'error'"

    return Check("cuda optim no host sync (set_sync_debug_mode)", fn, "cuda")


def graph_check():
    def fn(ctx):
        from ..optim import AdamW

        dev = _cuda()
        replays = 0
        for n in (6, 1000):  # 1,000 tensors: the device table tied to the graph
            captured, eager = _model_params(n, dev), _model_params(n, dev)
            lr_c, lr_e = torch.tensor(LR, device=dev), torch.tensor(LR, device=dev)
            opt_c = AdamW(captured, lr=lr_c, l2_weight=0.37, amsgrad=True, capturable=True)
            opt_e = AdamW(eager, lr=lr_e, l2_weight=0.37, amsgrad=True, capturable=True)
            _warm_up(lambda: (opt_c.step(), opt_e.step()))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt_c.step()
            value = opt_c.penalty
            for r in range(3):
                with torch.no_grad():  # new grads and a new lr between replays
                    for i, (a, b) in enumerate(zip(captured, eager)):
                        a.grad.copy_(randn(a.shape, a.dtype, dev, 3000 * (r + 1) + i))
                        b.grad.copy_(a.grad)
                    lr_c.fill_(LR / (r + 2))
                    lr_e.fill_(LR / (r + 2))
                graph.replay()
                opt_e.step()
                torch.cuda.synchronize()
                replays += 1
                if not refs.bit_equal(value, opt_e.penalty):
                    raise CheckFailed(f"{n} tensors, replay {r}: penalty {value.item()!r}, eager {opt_e.penalty.item()!r}")
                for i, (a, b) in enumerate(zip(captured, eager)):
                    if not refs.bit_equal(a.detach(), b.detach()):
                        raise CheckFailed(f"{n} tensors, replay {r}: param {i} differs from the eager step")
            del graph
        return f"step() captured with 6 and 1,000 tensors (capturable, lr a device tensor); {replays} replays " \
               "with new grads and lr bit-identical to eager steps"

    return Check("cuda optim graph capture and replay", fn, "cuda")


def _hyper(k):
    """Group k's hyperparameters (k = 0, 1, ...): amsgrad, maximize, decay and L2 weight vary."""
    return dict(lr=LR / (k + 1), betas=(0.9 - 0.02 * (k % 3), 0.999 - 0.005 * (k % 2)), eps=1e-8,
                weight_decay=0.1 * (k % 2), l2_weight=[0.37, 0.0, 1.5][k % 3], amsgrad=k % 2 == 1,
                maximize=k % 4 == 3)


def _groups(params, n_groups):
    """params spread over n_groups groups (param i in group i % n_groups); returns (groups, hyper)."""
    hyper = [_hyper(k) for k in range(n_groups)]
    groups = [param_group(params[k::n_groups], h) for k, h in enumerate(hyper)]
    return groups, hyper


def table_sizes_check():
    """Every table the launch picks: per-tensor records as a kernel parameter of 32, 64, 128, 256 or
    448 entries, a device table beyond; the groups in the arguments up to 4, a device table beyond.
    Each at its boundaries, against float64, with the launched kernel's table type checked."""
    def fn(ctx):
        from torch.profiler import ProfilerActivity, profile


        dev = _cuda()
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        worst, names = 0.0, []
        lists = [(n, 1) for n in (31, 32, 33, 64, 65, 128, 129, 256, 257, 448, 449, 1500)] + [(100, 6), (1500, 6)]
        for n, n_groups in lists:
            shapes = [(1 + (7 * i) % 699,) for i in range(n)]
            states = [_state(s, dtypes[i % 3], dev, 13 * n + i, _hyper(i % n_groups)["amsgrad"])
                      for i, s in enumerate(shapes)]
            params = [torch.nn.Parameter(p.clone()) for p, *_ in states]
            for param, (_, g, *_) in zip(params, states):
                param.grad = g.clone()
            groups, hyper = _groups(params, n_groups)
            order = [(params[i], i % n_groups, *states[i]) for k in range(n_groups) for i in range(k, n, n_groups)]
            opt, _ = _optimizer(groups, dev, 2, [(m, v, vmax) for *_, m, v, vmax in order])
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                opt.step()
                torch.cuda.synchronize()
            table = launched_table(prof, "adamw_kernel", (32, 64, 128, 256, 448), n)
            names.append(f"{n} tensors, {n_groups} groups: {table or 'no kernel name recorded'}")
            worst = max(worst, _check_step(opt, order, hyper, 3, f"{n} tensors in {n_groups} groups", dev))
        return (f"{len(lists)} lists of 31..1,500 tensors in 1 or 6 groups across every table size: every param "
                f"and state against float64, penalty within {worst:.2f} of its tolerance"), "\n".join(names)

    return Check("cuda optim every table size", fn, "cuda", estimate=4.0)


def captures_check(n_captures=200):
    """AdamW steps captured in graphs: the tables of a long list (1,000 tensors in 6 groups: the
    tensor table and the group table on the device) come from l2fast's capture pool and go back to it
    when the graph is destroyed, as the penalty's do; before, every captured step's pinned table was
    held for the life of the process."""
    def fn(ctx):
        from ..optim import AdamW

        dev = _cuda()
        groups, _ = _groups(_model_params(1000, dev), 6)
        opt = AdamW(groups, capturable=True)
        return captures_flat(opt.step, n_captures, "AdamW steps over 1,000 tensors in 6 groups")

    return Check(f"cuda optim {n_captures} captures, memory flat", fn, "cuda", estimate=10.0)


def bits_check():
    """The step's bits (params, moments, unscaled grads, the value) depend on the values and the
    list, not on the grid (set by the GPU's SM count and occupancy, here forced to 1..97 blocks) nor
    on where the tensors sit (9 element offsets, another for each of param, grad and state)."""
    def fn(ctx):
        from ..optim import AdamW

        internal = _internal()
        dev = _cuda()
        shapes = [((3_000_001,), torch.float32), ((70_001,), torch.float16), ((1025,), torch.bfloat16),
                  ((4097,), torch.float64), ((5,), torch.float32)] + [((1 + k % 50,), torch.float32)
                                                                      for k in range(700)]
        n_groups = 6
        states = [_state(s, dt, "cpu", 300 + 7 * i, _hyper(i % n_groups)["amsgrad"]) for i, (s, dt) in enumerate(shapes)]

        def run(offset):
            params = [torch.nn.Parameter(placed(p, offset, dev)) for p, *_ in states]
            for param, (_, g, *_) in zip(params, states):
                param.grad = placed(g * 4, (3 * offset + 1) % 9, dev)
            groups, _ = _groups(params, n_groups)
            opt = AdamW(groups)
            opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=dev), torch.tensor(0.0, device=dev)
            for i, param in enumerate(params):
                _, _, m, v, vmax = states[i]
                st = opt.state[param]
                st.update(step=torch.tensor(3.0, device=dev), exp_avg=placed(m, (offset + 2) % 9, dev),
                          exp_avg_sq=placed(v, (offset + 5) % 9, dev))
                if vmax is not None:
                    st["max_exp_avg_sq"] = placed(vmax, (offset + 7) % 9, dev)
            opt.step()
            out = [opt.penalty]
            for param in params:
                out += [param.detach(), param.grad] + [t for t in opt.state[param].values()]
            return [t.cpu() for t in out]

        base = run(0)
        for limit in (1, 2, 7, 97):
            with grid_limit(internal, limit):
                got = run(0)
            if not refs.all_bit_equal(base, got):
                raise CheckFailed(f"a grid of at most {limit} blocks changed the bits")
        for offset in range(1, 9):
            if not refs.all_bit_equal(base, run(offset)):
                raise CheckFailed(f"params at element offset {offset} (grads and state at others) changed the bits")
        return (f"{len(shapes)} tensors (4 dtypes, 6 groups: device tables) with GradScaler: bit-identical params, "
                "state, unscaled grads and value over grids of 1..97 blocks and 9 element offsets")

    return Check("cuda optim bits independent of grid and alignment", fn, "cuda", estimate=4.0)


def accuracy_check():
    """The step's penalty value keeps the penalty ops' promise: constant values (the worst case for
    float32 running sums) within 1e-6 relative of float64 up to 10^8 float32 values, float16 and
    bfloat16 too, in a step and in a step GradScaler skips."""
    def fn(ctx):
        from ..optim import AdamW

        dev = _cuda()
        cases = [(torch.float32, 10**8, 0.5025), (torch.float32, 10_000_000, 8.4107),
                 (torch.float32, 1_000_003, 7.77), (torch.float16, 10_000_019, 0.497),
                 (torch.bfloat16, 10_000_019, 0.497), (torch.float16, 3_000_017, 0.5025)]
        worst = 0.0
        for dtype, n, v in cases:
            for skip in (False, True):
                try:
                    param = torch.nn.Parameter(torch.full((n,), v, device=dev, dtype=dtype))
                    opt = AdamW([param], lr=LR, l2_weight=1.0)
                    if skip:
                        opt.grad_scale = torch.tensor(1.0, device=dev)
                        opt.found_inf = torch.tensor(1.0, device=dev)
                    opt.step()
                except torch.OutOfMemoryError:
                    raise Skip(f"not enough GPU memory for {n:,} values") from None
                expected = refs.exact_constant_sq_norm(v, n, dtype)
                err = abs(opt.penalty.item() - expected) / expected
                if not err <= 1e-6:
                    raise CheckFailed(f"{'skipped ' if skip else ''}step over {n:,} {refs.dtype_name(dtype)} values "
                                      f"all {v!r}: penalty {opt.penalty.item()!r}, exactly {expected!r} "
                                      f"(relative error {err:.2e} > 1e-6)")
                worst = max(worst, err)
                del param, opt
        return (f"{2 * len(cases)} steps (found_inf 0 and 1) over constant tensors up to 10^8 values (float32, "
                f"float16, bfloat16): worst relative error {worst:.1e}")

    return Check("cuda optim accuracy on constant values", fn, "cuda", estimate=3.0)


def bandwidth_check():
    def fn(ctx):
        from ..bench.timing import compare
        from ..optim import AdamW

        dev = _cuda()
        n = 100_000_000
        try:
            ours = [torch.nn.Parameter(torch.randn(n, device=dev))]
            theirs = [torch.nn.Parameter(torch.randn(n, device=dev))]
            src = torch.empty(n * 14 // 4, device=dev)  # a copy moves 28 bytes per value: 14 read, 14 written
            dst = torch.empty_like(src)
        except torch.OutOfMemoryError:
            raise Skip("not enough GPU memory for 1e8 values") from None
        for p in ours + theirs:
            p.grad = torch.randn_like(p)
        opt = AdamW(ours, lr=1e-4, l2_weight=1e-4)
        ref = torch.optim.AdamW(theirs, lr=1e-4, fused=True)
        t = compare({"l2fast.optim.AdamW": opt.step, "torch fused AdamW": ref.step, "copy": lambda: dst.copy_(src)},
                    rounds=5)
        gbps = 28 * n / t["l2fast.optim.AdamW"] / 1e9
        table = "\n".join(f"{k}: {v * 1e3:.3f} ms" for k, v in t.items())
        return (f"1e8 float32 values: {gbps:,.0f} GB/s (28 B/value), {t['copy'] / t['l2fast.optim.AdamW']:.0%} of a "
                f"same-bytes copy; {t['l2fast.optim.AdamW'] / t['torch fused AdamW']:.2f}x torch's fused AdamW "
                "alone (no penalty)"), table

    return Check("cuda optim bandwidth at 1e8 values", fn, "cuda", bench=True)


def checks(device):
    return [values_check(device), torch_parity_check(device), grad_scaler_check(device), determinism_check(device)]


def cuda_checks():
    from .checks_proc import bench_check

    return [one_launch_check(), table_sizes_check(), no_sync_check(), graph_check(), captures_check(), bits_check(),
            accuracy_check(), bandwidth_check(),
            bench_check("cuda bench optim", ["optim", "--device", "cuda", "--sizes", "mlp,1M,10M,100M"])]
