"""The checks that run on every device: values and grads against float64, views, zero-size tensors,
1,000 tensors, aliasing rejections, per-tensor weights, param groups and determinism."""
import torch

from . import refs
from .refs import WEIGHT, check_grad, check_grad_update, check_unchanged, check_value, randn, snapshot
from .runner import Check, CheckFailed, Skip

MODES = ("value", "accumulate", "fresh", "backward")
PAD = 2**24 + 7  # elements: > 2 x 132 SMs x 64 KiB in every dtype
MODE_DOC = {
    "value": "value only (l2_penalty, sq_norm; nothing written)",
    "accumulate": "l2_penalty_ adding into existing grads",
    "fresh": "l2_penalty_ writing fresh grads (None, and NaN-filled `fresh` grads)",
    "backward": "differentiable l2_penalty / sq_norm + autograd.grad",
}


def _l2fast():
    import l2fast

    return l2fast


# --- one mode over one list of params; each returns the worst error as a fraction of the tolerance

def run_value(params, device, ref, weight=WEIGHT):
    l2fast = _l2fast()
    before = snapshot(params)
    worst = check_value("l2_penalty", l2fast.l2_penalty(params, weight), weight * ref.sq_norm(params), params, device)
    worst = max(worst, check_value("sq_norm", l2fast.sq_norm(params), ref.sq_norm(params), params, device))
    check_unchanged("params after a value-only call", params, before)
    return worst


def run_accumulate(params, device, ref, weight=WEIGHT):
    l2fast = _l2fast()
    for i, p in enumerate(params):
        p.grad = randn(p.shape, p.dtype, device, seed=7919 + i)
    grads = [p.grad for p in params]
    g_old = snapshot(grads)
    before = snapshot(params)
    worst = check_value("l2_penalty_", l2fast.l2_penalty_(params, weight), weight * ref.sq_norm(params), params, device)
    for i, (p, g, g0) in enumerate(zip(params, grads, g_old)):
        if p.grad is not g:
            raise CheckFailed(f"l2_penalty_: params[{i}].grad was replaced; expected an in-place update")
        worst = max(worst, check_grad_update(f"params[{i}].grad", p.grad, g0, p, 2 * weight, ref))
    check_unchanged("params", params, before)
    return worst


def run_fresh(params, device, ref, weight=WEIGHT):
    l2fast = _l2fast()
    for p in params:
        p.grad = None
    worst = check_value("l2_penalty_", l2fast.l2_penalty_(params, weight), weight * ref.sq_norm(params), params, device)
    for i, p in enumerate(params):
        worst = max(worst, check_grad_update(f"fresh params[{i}].grad", p.grad, None, p, 2 * weight, ref))
    # The op's `fresh` list: those grads are overwritten, whatever they held (NaN here).
    grads = [torch.full_like(p, float("nan")) if i % 2 == 0 else randn(p.shape, p.dtype, device, 31 + i)
             for i, p in enumerate(params)]
    g_old = snapshot(grads)
    fresh = list(range(0, len(params), 2))
    value = torch.ops.l2fast.l2_penalty_(params, grads, weight, fresh)
    worst = max(worst, check_value("l2_penalty_(fresh=...)", value, weight * ref.sq_norm(params), params, device))
    for i, (p, g, g0) in enumerate(zip(params, grads, g_old)):
        worst = max(worst, check_grad_update(f"grads[{i}] ({'fresh' if i % 2 == 0 else 'accumulated'})", g,
                                             None if i % 2 == 0 else g0, p, 2 * weight, ref))
    return worst


def run_backward(params, device, ref, weight=WEIGHT):
    l2fast = _l2fast()
    leaves = [p.detach().requires_grad_() for p in params]
    value = l2fast.l2_penalty(leaves, weight)
    worst = check_value("l2_penalty", value.detach(), weight * ref.sq_norm(params), params, device)
    c = 1.7  # d(loss)/d(value) != 1, as when the penalty is scaled inside a loss
    if leaves:
        grads = torch.autograd.grad(value, leaves, grad_outputs=torch.tensor(c, dtype=value.dtype, device=device))
        for i, (p, g) in enumerate(zip(params, grads)):
            worst = max(worst, check_grad_update(f"d l2_penalty / d params[{i}]", g, None, p, 2 * weight * c, ref))
        grads = torch.autograd.grad(l2fast.sq_norm(leaves), leaves)
        for i, (p, g) in enumerate(zip(params, grads)):
            worst = max(worst, check_grad_update(f"d sq_norm / d tensors[{i}]", g, None, p, 2.0, ref))
    return worst


RUN = {"value": run_value, "accumulate": run_accumulate, "fresh": run_fresh, "backward": run_backward}


def values_check(device, dtype, mode, ref=None):
    """`mode` for `dtype` at every chunk-boundary size: each size alone, then all in one call."""
    ref = ref or refs.Reference()

    def fn(ctx):
        dev = torch.device(device)
        sizes = refs.boundary_sizes(ctx.quick)
        calls = [[n] for n in sizes] + [sizes]
        if dev.type == "cuda":
            # The CUDA kernel shrinks its chunks (64 KiB down to 4 KiB) when the total is small; a
            # large first tensor makes it use its largest chunks for the boundary sizes too.
            calls.append([PAD] + sizes)
        worst = 0.0
        for c, ns in enumerate(calls):
            params = [randn((n,), dtype, dev, seed=1000 * c + j) for j, n in enumerate(ns)]
            worst = max(worst, RUN[mode](params, dev, ref))
        pad = f", and after a {PAD:,}-element tensor" if dev.type == "cuda" else ""
        return (f"{MODE_DOC[mode]}; {len(sizes)} sizes 1..{max(sizes):,} around k*2^e, one per call and all in "
                f"one call{pad}; {refs.within(worst)}")

    return Check(f"{device} {refs.dtype_name(dtype)} {mode}", fn, device)


# --- views -------------------------------------------------------------------------------------

def _views(quick):
    """(what, make_base(dtype, device, seed), view) with views a model really has."""
    wide = (40, 2 * 16385) if quick else (300, 2 * 8193)  # crosses many chunks

    def plain(shape):
        return lambda dtype, device, seed: randn(shape, dtype, device, seed)

    def channels_last(dtype, device, seed):
        return randn((8, 3, 5, 5), dtype, device, seed).to(memory_format=torch.channels_last)

    return [
        ("every other column of a Linear weight", plain((40, 80)), lambda b: b[:, ::2]),
        ("a transposed weight", plain((64, 33)), lambda b: b.t()),
        ("an expanded bias", plain((5, 1)), lambda b: b.expand(5, 300)),
        ("a slice with an offset", plain((1000,)), lambda b: b[3:-2]),
        ("narrowed and permuted 3-D", plain((6, 50, 7)), lambda b: b[1:5].permute(2, 0, 1)),
        ("a channels_last conv weight", channels_last, lambda b: b),
        (f"a strided {wide[0]}x{wide[1] // 2} view", plain(wide), lambda b: b[:, ::2]),
        ("overlapping views of one buffer (a)", plain((900,)), lambda b: b[:600]),
    ]


def _grad_layouts(p, device, seed):
    """A grad for p in one of three layouts: contiguous, dense with permuted strides, non-dense."""
    kind = seed % 3
    if kind == 0 or p.dim() == 0:
        return randn(p.shape, p.dtype, device, seed)
    if kind == 1:
        return randn(tuple(reversed(p.shape)), p.dtype, device, seed).permute(*reversed(range(p.dim())))
    shape = (*p.shape[:-1], 2 * p.shape[-1])
    return randn(shape, p.dtype, device, seed)[..., ::2]


def views_check(device):
    def fn(ctx):
        l2fast = _l2fast()
        dev = torch.device(device)
        ref = refs.Reference()
        worst = 0.0
        for d, dtype in enumerate(refs.DTYPES):
            views = _views(ctx.quick)
            bases = [make(dtype, dev, 100 * d + i) for i, (_, make, _) in enumerate(views)]
            params = [view(b) for b, (_, _, view) in zip(bases, views)]
            params.append(bases[-1][300:])  # overlaps the last view: params may overlap (read only)
            names = [v[0] for v in views] + ["overlapping views of one buffer (b)"]
            try:
                worst = max(worst, run_value(params, dev, ref))
                # accumulate into grads of three layouts, through the op
                grads = [_grad_layouts(p, dev, 7 * d + i) for i, p in enumerate(params)]
                g_old = snapshot(grads)
                value = torch.ops.l2fast.l2_penalty_(params, grads, WEIGHT, [])
                worst = max(worst, check_value("l2_penalty_", value, WEIGHT * ref.sq_norm(params), params, dev))
                for i, (p, g, g0) in enumerate(zip(params, grads, g_old)):
                    worst = max(worst, check_grad_update(f"grad of {names[i]}", g, g0, p, 2 * WEIGHT, ref))
                worst = max(worst, run_fresh(params, dev, ref))
                worst = max(worst, _views_backward(l2fast, views, dtype, dev, d))
            except CheckFailed as e:
                raise CheckFailed(f"{refs.dtype_name(dtype)}: {e}") from None
        return f"{len(_views(ctx.quick)) + 1} views x 4 dtypes x 4 modes; {refs.within(worst)}"

    return Check(f"{device} non-contiguous views", fn, device)


def _views_backward(l2fast, views, dtype, device, d):
    """Autograd through real views into their bases, against float64 autograd on the same views."""
    worst = 0.0
    for i, (what, make, view) in enumerate(views):
        base = make(dtype, device, 100 * d + i).requires_grad_()
        (got,) = torch.autograd.grad(l2fast.l2_penalty([view(base)], WEIGHT), [base])
        base64 = base.detach().double().requires_grad_()
        (expected,) = torch.autograd.grad(WEIGHT * (view(base64) ** 2).sum(), [base64])
        # An expanded view's grad is a sum over copies done by torch at the base's dtype: allow more.
        slack = 4.0 if "expanded" in what else 1.0
        worst = max(worst, check_grad(f"d l2_penalty / d base of {what}", got, expected, expected.abs(),
                                      dtype, base.shape, slack))
    return worst


# --- zero-size, many tensors ------------------------------------------------------------------

def zero_size_check(device):
    def fn(ctx):
        l2fast = _l2fast()
        dev = torch.device(device)
        ref = refs.Reference()
        for name, fn_ in (("l2_penalty", lambda: l2fast.l2_penalty([], WEIGHT)),
                          ("sq_norm", lambda: l2fast.sq_norm([])),
                          ("l2_penalty_", lambda: l2fast.l2_penalty_([], WEIGHT))):
            v = fn_()
            if v.shape != () or v.item() != 0.0:
                raise CheckFailed(f"{name}([]) gave {v!r}; expected a 0-dim zero")
        cases = 0
        for dtype in refs.DTYPES:
            empties = [randn(s, dtype, dev, 0) for s in ((0,), (3, 0), (0, 5, 7), (2, 0, 4))]
            mixed = [randn((5,), dtype, dev, 1), empties[0], randn((3, 4), dtype, dev, 2), empties[2]]
            for params in (empties, mixed):
                for mode in MODES:
                    RUN[mode]([p.clone() for p in params], dev, ref)
                    cases += 1
        return f"empty lists; all-empty and mixed lists x 4 dtypes x 4 modes ({cases} cases)"

    return Check(f"{device} zero-size tensors", fn, device)


def many_tensors_check(device, n=1000):
    def fn(ctx):
        dev = torch.device(device)
        ref = refs.Reference()
        g = torch.Generator().manual_seed(n)
        sizes = torch.randint(0, 700, (n,), generator=g).tolist()
        worst = 0.0
        for name, dtypes in (("float32", (torch.float32,)), ("float32/16/bf16", refs.DTYPES[:1] + refs.DTYPES[2:]),
                             ("all four", refs.DTYPES)):
            params = [randn((s,), dtypes[i % len(dtypes)], dev, i) for i, s in enumerate(sizes)]
            for mode in MODES:
                worst = max(worst, RUN[mode](params, dev, ref))
            # Some grads None, some not: one call both writes and accumulates.
            for i, p in enumerate(params):
                p.grad = None if i % 3 == 0 else randn(p.shape, p.dtype, dev, 5 * i)
            g_old = [None if p.grad is None else p.grad.clone() for p in params]
            value = _l2fast().l2_penalty_(params, WEIGHT)
            worst = max(worst, check_value("l2_penalty_ (mixed None/existing grads)", value,
                                           WEIGHT * ref.sq_norm(params), params, dev))
            for i, (p, g0) in enumerate(zip(params, g_old)):
                worst = max(worst, check_grad_update(f"params[{i}].grad", p.grad, g0, p, 2 * WEIGHT, ref))
        return (f"{n:,} tensors of 0..699 elements, float32 / mixed / with float64, 4 modes and a mixed "
                f"None/existing-grad call; {refs.within(worst)}")

    return Check(f"{device} {n:,} tensors", fn, device)


# --- aliasing ----------------------------------------------------------------------------------

_REJECT = (RuntimeError, ValueError, TypeError, IndexError)


def _expect_rejected(what, call, watched, indices):
    """`call` must raise, name every index in `indices`, and leave `watched` bit-identical."""
    before = snapshot(watched)
    try:
        call()
    except _REJECT as e:
        msg = str(e).split("\n")[0]
        missing = [i for i in indices if f"[{i}]" not in msg]
        if missing:
            raise CheckFailed(f"{what}: rejected, but the message does not name index {missing}: {msg!r}") from None
    else:
        raise CheckFailed(f"{what}: accepted; expected an error naming indices {list(indices)} before any write")
    check_unchanged(f"{what} (rejected)", watched, before)
    return msg


def aliasing_check(device):
    def fn(ctx):
        l2fast = _l2fast()
        dev = torch.device(device)
        f32 = torch.float32
        cases = []

        # 1. one grad tensor shared by two params (what a careless `q.grad = p.grad` gives)
        p1, p2 = randn((1 << 18,), f32, dev, 1), randn((1 << 18,), f32, dev, 2)
        shared = randn((1 << 18,), f32, dev, 3)
        p1.grad = shared
        p2.grad = shared
        cases.append(("a grad shared by two params", lambda: l2fast.l2_penalty_([p1, p2], WEIGHT),
                      [p1, p2, shared], (0, 1)))

        # 2. the same param listed twice, with its grad
        p = randn((1 << 18,), f32, dev, 4)
        p.grad = randn((1 << 18,), f32, dev, 5)
        cases.append(("the same param twice with its grad", lambda: l2fast.l2_penalty_([p, p], WEIGHT),
                      [p, p.grad], (0, 1)))

        # 3. a grad overlapping another param (not its own)
        buf = randn((300,), f32, dev, 6)
        pa, pb = buf[:150], randn((100,), f32, dev, 7)
        ga, gb = randn((150,), f32, dev, 8), buf[100:200]
        cases.append(("grads[1] overlapping params[0]",
                      lambda: torch.ops.l2fast.l2_penalty_([pa, pb], [ga, gb], WEIGHT, []), [buf, pb, ga], (0, 1)))

        # 4. two grads overlapping in part
        gbuf = randn((250,), f32, dev, 9)
        q0, q1 = randn((150,), f32, dev, 10), randn((150,), f32, dev, 11)
        cases.append(("grads[0] and grads[1] overlapping in part",
                      lambda: torch.ops.l2fast.l2_penalty_([q0, q1], [gbuf[:150], gbuf[100:]], WEIGHT, []),
                      [gbuf, q0, q1], (0, 1)))

        # 5. a grad that is its own param
        r = randn((64,), f32, dev, 12)
        cases.append(("grads[0] is params[0]", lambda: torch.ops.l2fast.l2_penalty_([r], [r], WEIGHT, []), [r], (0,)))

        # 6. a fresh grad shared with another grad
        s0, s1 = randn((80,), f32, dev, 13), randn((80,), f32, dev, 14)
        sg = randn((80,), f32, dev, 15)
        cases.append(("a fresh grad shared with another grad",
                      lambda: torch.ops.l2fast.l2_penalty_([s0, s1], [sg, sg], WEIGHT, [0]), [s0, s1, sg], (0, 1)))

        for what, call, watched, indices in cases:
            _expect_rejected(what, call, watched, indices)

        # Overlapping params are legal (only read): accepted and correct.
        ref = refs.Reference()
        base = randn((5000,), f32, dev, 16)
        params = [base[:3000], base[2000:], base[::2]]
        run_accumulate(params, dev, ref)
        return (f"{len(cases)} aliasing cases rejected naming both indices, nothing modified; "
                "overlapping params accepted")

    return Check(f"{device} aliasing rejected", fn, device)


# --- per-tensor weights and param groups ---------------------------------------------------------

def has_weights_argument():
    schema = torch.ops.l2fast.l2_penalty_.default._schema
    return any(a.name == "weights" for a in schema.arguments)


def weights_check(device):
    def fn(ctx):
        if not has_weights_argument():
            raise Skip("this build's ops have no per-tensor `weights` argument")
        dev = torch.device(device)
        ref = refs.Reference()
        nan = float("nan")
        dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float32)
        sizes = (16385, 700, 3, 20000, 129, 5)
        ws = [1.0, 0.5, 0.0, 2.0, 0.0, 1e-3]
        params = [randn((n,), dt, dev, i) for i, (n, dt) in enumerate(zip(sizes, dtypes))]
        params[2].fill_(nan)  # weight 0: must not be read
        worst = check_value("l2_penalty(weights=)", torch.ops.l2fast.l2_penalty(params, WEIGHT, weights=ws),
                            WEIGHT * ref.sq_norm(params, ws), params, dev)

        grads = [randn((n,), dt, dev, 50 + i) for i, (n, dt) in enumerate(zip(sizes, dtypes))]
        grads[4].fill_(nan)  # fresh with weight 0: zero-filled
        g_old = snapshot(grads)
        fresh = [4, 5]
        value = torch.ops.l2fast.l2_penalty_(params, grads, WEIGHT, fresh, weights=ws)
        worst = max(worst, check_value("l2_penalty_(weights=)", value, WEIGHT * ref.sq_norm(params, ws), params, dev))
        for i, (p, g, g0) in enumerate(zip(params, grads, g_old)):
            if ws[i] == 0.0 and i not in fresh:
                check_unchanged(f"grads[{i}] (weight 0, not fresh)", [g], [g0])
            elif ws[i] == 0.0:
                if not bool((g == 0).all()):
                    raise CheckFailed(f"grads[{i}] (weight 0, fresh) is not zero-filled")
            else:
                worst = max(worst, check_grad_update(f"grads[{i}]", g, None if i in fresh else g0, p,
                                                     2 * WEIGHT * ws[i], ref))

        leaves = [p.detach().requires_grad_() for p in params]
        value = torch.ops.l2fast.l2_penalty(leaves, WEIGHT, weights=ws)
        agrads = torch.autograd.grad(value, leaves, grad_outputs=torch.tensor(1.5, dtype=value.dtype, device=dev))
        bgrads = torch.ops.l2fast.l2_penalty_backward(torch.tensor(1.5, device=dev), params, WEIGHT, weights=ws)
        for what, got in (("autograd through l2_penalty(weights=)", agrads), ("l2_penalty_backward(weights=)", bgrads)):
            for i, (p, g) in enumerate(zip(params, got)):
                if ws[i] == 0.0:
                    if not bool((g == 0).all()):
                        raise CheckFailed(f"{what}: grads[{i}] (weight 0) is not zero")
                else:
                    worst = max(worst, check_grad_update(f"{what} grads[{i}]", g, None, p,
                                                         2 * WEIGHT * 1.5 * ws[i], ref))

        good = [p for p, w in zip(params, ws) if w != 0.0]
        grads = [torch.zeros_like(p) for p in good]
        for idx, bad in ((1, nan), (2, float("inf"))):
            ws_bad = [1.0] * len(good)
            ws_bad[idx] = bad
            _expect_rejected(f"weights[{idx}] = {bad}", lambda: torch.ops.l2fast.l2_penalty_(
                good, grads, WEIGHT, [], weights=ws_bad), good + grads, (idx,))
        try:
            torch.ops.l2fast.l2_penalty_(good, grads, float("inf"), [], weights=[1.0] * 4)
        except _REJECT as e:
            if "weight" not in str(e):
                raise CheckFailed(f"weight = inf: rejected without naming `weight`: {e}") from None
        else:
            raise CheckFailed("weight = inf: accepted; expected a non-finite weight to be rejected")
        if not bool((torch.stack([g.double().abs().sum() for g in grads]) == 0).all()):
            raise CheckFailed("a rejected call wrote into grads")
        return (f"value, grads (weight 0 not read, fresh zero-filled), backward, non-finite rejected; "
                f"{refs.within(worst)}")

    return Check(f"{device} per-tensor weights", fn, device)


def param_groups_check(device):
    def fn(ctx):
        l2fast = _l2fast()
        if not hasattr(l2fast, "decay_groups") and not _accepts_groups(l2fast):
            raise Skip("this l2fast has no param groups (l2fast.decay_groups)")
        dev = torch.device(device)
        ref = refs.Reference()
        a, b, c, d = (randn(s, torch.float32, dev, i) for i, s in enumerate(((30, 20), (20,), (7,), (16385,))))
        c.fill_(float("nan"))  # a group of weight 0 is not read at all
        for i, t in enumerate((a, b, c, d)):
            t.grad = randn(t.shape, t.dtype, dev, 60 + i)
        g_old = [t.grad.clone() for t in (a, b, c, d)]
        groups = [{"params": [a, b], "weight": 0.01}, {"params": [c], "weight": 0.0}, {"params": [d]}]
        value = l2fast.l2_penalty_(groups, WEIGHT)
        expected = 0.01 * ref.sq_norm([a, b]) + WEIGHT * ref.sq_norm([d])
        worst = check_value("l2_penalty_(groups)", value, expected, [a, b, c, d], dev)
        for t, g0, w in ((a, g_old[0], 0.01), (b, g_old[1], 0.01), (d, g_old[3], WEIGHT)):
            worst = max(worst, check_grad_update("grad", t.grad, g0, t, 2 * w, ref))
        check_unchanged("grad of a weight-0 group", [c.grad], [g_old[2]])
        leaves = [t.detach().requires_grad_() for t in (a, b, d)]
        v = l2fast.l2_penalty([{"params": leaves[:2], "weight": 0.01}, {"params": leaves[2:]}], WEIGHT)
        worst = max(worst, check_value("l2_penalty(groups)", v.detach(), 0.01 * ref.sq_norm([a, b]) + WEIGHT *
                                       ref.sq_norm([d]), [a, b, d], dev))
        for t, g, w in zip((a, b, d), torch.autograd.grad(v, leaves), (0.01, 0.01, WEIGHT)):
            worst = max(worst, check_grad_update("d l2_penalty(groups)", g, None, t, 2 * w, ref))
        snap = [t.grad.clone() for t in (a, b, d)]
        _expect_rejected("a param in two groups", lambda: l2fast.l2_penalty_(
            [{"params": [a, b]}, {"params": [b]}], WEIGHT), [a, b, *snap], ())
        check_unchanged("grads after a rejected group call", [t.grad for t in (a, b, d)], snap)
        _expect_rejected("a non-numeric group weight", lambda: l2fast.l2_penalty_(
            [{"params": [a], "weight": "0.1"}], WEIGHT), [a, a.grad], ())
        return (f"3 groups (0.01, 0 with NaN params, default), value + grads + autograd; bad groups rejected; "
                f"{refs.within(worst)}")

    return Check(f"{device} param groups", fn, device)


def _accepts_groups(l2fast):
    try:
        l2fast.l2_penalty([{"params": [torch.ones(2)], "weight": 1.0}], 1.0)
        return True
    except (TypeError, ValueError, RuntimeError):
        return False


def direct_call_check(device):
    """L2Penalty.add_grad_ skips the dispatcher (and, for the tensors it checked last time, the checks):
    it must give the op's bits, and still see a grad swapped for one that aliases another."""
    def fn(ctx):
        l2fast = _l2fast()
        if not hasattr(l2fast, "_C") or not hasattr(l2fast._C, "_add_grad_"):
            raise Skip("this l2fast has no direct call")
        dev = torch.device(device)
        ref = refs.Reference()
        base = randn((16385 * 3 + 5,), torch.float32, dev, 70)
        params = [randn((300, 70), torch.float32, dev, 71).t(), base[5:].view(3, 16385),
                  randn((33,), torch.float32, dev, 72)]
        params = [p.requires_grad_() for p in params]
        params[0].grad = randn((70, 300), torch.float32, dev, 73)
        params[2].grad = randn((33,), torch.float32, dev, 74)
        twins = [p.detach().clone().requires_grad_() for p in params]
        for p, q in zip(params, twins):
            q.grad = None if p.grad is None else p.grad.clone()
        weights = [0.5, 0.5, 0.25]
        pen = l2fast.L2Penalty([{"params": params[:2], "weight": 0.5}, {"params": params[2:], "weight": 0.25}])
        if pen._direct is None:
            raise CheckFailed("L2Penalty over plain tensors has no direct call")
        g_old = snapshot([p.grad for p in params if p.grad is not None])
        expected = sum(w * ref.sq_norm([p]) for p, w in zip(params, weights))
        for call in range(3):  # the first call checks the tensors, the next ones reuse that
            got = l2fast._C._add_grad_(pen.param_groups, *pen._direct)
            if got is None:
                raise CheckFailed(f"call {call}: the direct call stepped aside for plain tensors, no mode")
            fresh = [i for i, q in enumerate(twins) if q.grad is None]
            grads = [torch.zeros_like(q) if q.grad is None else q.grad for q in twins]
            want = torch.ops.l2fast.l2_penalty_(twins, grads, 1.0, fresh, weights)
            for i in fresh:
                twins[i].grad = grads[i]
            if call == 0:
                worst = check_value("L2Penalty.add_grad_", got, expected, params, dev)
                olds = iter(g_old)
                for i, (p, w) in enumerate(zip(params, weights)):
                    g0 = None if i == 1 else next(olds)
                    worst = max(worst, check_grad_update(f"params[{i}].grad", p.grad, g0, p, 2 * w, ref))
            if not refs.bit_equal(got, want):
                raise CheckFailed(f"call {call}: value {got.item()!r} differs from the op's {want.item()!r}")
            for i, (p, q) in enumerate(zip(params, twins)):
                if not refs.bit_equal(p.grad, q.grad):
                    raise CheckFailed(f"call {call}: params[{i}].grad differs from the op's (expected the same bits)")
        params[2].grad = params[0].grad.reshape(-1)[:33]  # now a view of grads[0]: must be seen, not skipped
        _expect_rejected("a grad swapped for a view of another after a checked call", pen.add_grad_,
                         [p.grad for p in params], (0, 2))
        return (f"3 views, 2 weights, a fresh grad: 3 calls bit-identical to the op, the first within "
                f"tolerance of float64 (worst {worst:.2f}); a later alias rejected")

    return Check(f"{device} L2Penalty direct call", fn, device)


# --- determinism -------------------------------------------------------------------------------

def determinism_check(device):
    def fn(ctx):
        l2fast = _l2fast()
        dev = torch.device(device)
        n_big = 1_000_001 if ctx.quick else 3_000_001
        sizes = [n_big, 5, 70_000, 16383, 16385, 0, 999_999, 33]
        dtypes = [refs.DTYPES[i % 4] for i in range(len(sizes))]
        params = [randn((n,), dt, dev, i) for i, (n, dt) in enumerate(zip(sizes, dtypes))]
        params_f32 = [p.float() for p in params]
        g0 = [randn((n,), dt, dev, 90 + i) for i, (n, dt) in enumerate(zip(sizes, dtypes))]

        def once():
            grads = [g.clone() for g in g0]
            out = [torch.ops.l2fast.l2_penalty_(params, grads, WEIGHT, [1, 3]), l2fast.l2_penalty(params_f32, WEIGHT),
                   l2fast.sq_norm(params)]
            out += torch.ops.l2fast.l2_penalty_backward(torch.tensor(0.3, device=dev), params, WEIGHT)
            return out + grads

        runs, threads = refs.identical_runs(once, dev, 3)
        return f"{len(runs)} runs of 4 ops over {sum(sizes):,} values bit-identical{threads}"

    return Check(f"{device} determinism", fn, device)


def checks(device):
    out = [values_check(device, dt, mode) for dt in refs.DTYPES for mode in MODES]
    out += [views_check(device), zero_size_check(device), many_tensors_check(device), aliasing_check(device),
            weights_check(device), param_groups_check(device), direct_call_check(device), determinism_check(device)]
    return out

