"""The kernels' numerics (issue 18 items 3 and 5, issue 17 item 4): accuracy where float32 running
sums drift most (constant values), scales outside float32's range, weights whose product overflows,
and results that do not depend on where the tensors sit in memory. CPU and, where present, CUDA.
The CUDA launch machinery (tables, grid, pinned pool) is tested at the end, on a GPU only."""
import gc
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import l2fast
import l2fast.ops  # noqa: F401  (registers torch.ops.l2fast.*)
from l2fast.optim import AdamW
from l2fast.selftest.checks_cuda import _pool_in_use_after_release
from l2fast.selftest.refs import exact_constant_sq_norm

OPS = torch.ops.l2fast
F32_MAX = torch.finfo(torch.float32).max


# --- accuracy (issue 18 item 3) ---------------------------------------------------------------

@pytest.mark.parametrize("n", [16_384, 1_000_003, 10_000_000])
@pytest.mark.parametrize("value", [0.5025, 1 / 3, 0.1, 7.77])
def test_constant_float32_within_1e_6(device, n, value):
    """Constant values: every float32 add of a running sum rounds the same way, so a long running
    sum drifts linearly. The README promises 1e-6 relative at every size."""
    x = torch.full((n,), value, device=device)
    ref = exact_constant_sq_norm(value, n, torch.float32)
    got = l2fast.sq_norm([x]).item()
    assert abs(got - ref) / ref < 1e-6, (got, ref)
    x.grad = torch.zeros_like(x)  # the same pass with a grad written
    got = l2fast.l2_penalty_([x], 0.5).item()
    assert abs(got - 0.5 * ref) / (0.5 * ref) < 1e-6, (got, 0.5 * ref)


def test_constant_1e8_float32_within_1e_6(device):
    """The issue's own case: 10^8 values of 0.5025 were 7.55e-6 off (torch's sum: 4.9e-8)."""
    x = torch.full((10**8,), 0.5025, device=device)
    ref = exact_constant_sq_norm(0.5025, 10**8, torch.float32)
    got = l2fast.sq_norm([x]).item()
    del x
    assert abs(got - ref) / ref < 1e-6, (got, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_constant_half_precision_within_1e_6(device, dtype):
    """float16/bfloat16 are summed in float32 as well: the same drift, the same promise."""
    n = 3_000_017
    x = torch.full((n,), 0.5025, device=device, dtype=dtype)
    ref = exact_constant_sq_norm(0.5025, n, dtype)
    got = l2fast.sq_norm([x]).item()
    assert abs(got - ref) / ref < 1e-6, (got, ref)


def test_many_constant_tensors_within_1e_6(device):
    """Many tensors, each a different constant, summed over chunks of every size."""
    sizes = [1, 3, 8191, 8193, 16_385, 70_001, 1_000_001]
    values = [0.3, 1.7, 0.5025, 2.0 / 3, 0.1, 5.5, 0.999]
    xs = [torch.full((n,), v, device=device) for n, v in zip(sizes, values)]
    ref = sum(exact_constant_sq_norm(v, n, torch.float32) for n, v in zip(sizes, values))
    got = l2fast.sq_norm(xs).item()
    assert abs(got - ref) / ref < 1e-6, (got, ref)


# --- the AdamW step's penalty value: the same promise (l2fast.optim.AdamW, adamw_) ---------------------

def adamw_penalty(xs, weights=None, skip=False):
    """The value of one l2fast.optim.AdamW step over params `xs` (one group each, weight 1 or
    `weights[i]`), without data grads (the penalty's gradient alone); with `skip`, GradScaler's
    found_inf is 1: nothing is updated, the value is still summed."""
    weights = weights or [1.0] * len(xs)
    params = [torch.nn.Parameter(x) for x in xs]
    opt = AdamW([{"params": [p], "weight": w} for p, w in zip(params, weights)], lr=1e-3)
    if skip:
        opt.grad_scale = torch.tensor(1.0, device=xs[0].device)
        opt.found_inf = torch.tensor(1.0, device=xs[0].device)
    opt.step()
    return opt.penalty.item()


@pytest.mark.parametrize("skip", [False, True], ids=["step", "found_inf"])
@pytest.mark.parametrize("n", [16_384, 1_000_003, 10_000_000])
@pytest.mark.parametrize("value", [0.5025, 1 / 3, 7.77, 8.4107])
def test_adamw_constant_float32_within_1e_6(device, n, value, skip):
    """As the penalty ops: 1e-6 relative at every size. (8.4107: a float32 running sum of 64 of its
    squares is 1.02e-6 off, as the first CUDA kernel summed them.)"""
    x = torch.full((n,), value, device=device)
    ref = exact_constant_sq_norm(value, n, torch.float32)
    got = adamw_penalty([x], skip=skip)
    assert abs(got - ref) / ref < 1e-6, (got, ref)


@pytest.mark.slow
def test_adamw_constant_1e8_float32_within_1e_6(device):
    """The README's case, through the optimizer: 10^8 values of 0.5025."""
    ref = exact_constant_sq_norm(0.5025, 10**8, torch.float32)
    got = adamw_penalty([torch.full((10**8,), 0.5025, device=device)])
    assert abs(got - ref) / ref < 1e-6, (got, ref)


@pytest.mark.parametrize("skip", [False, True], ids=["step", "found_inf"])
@pytest.mark.parametrize("n,value", [(3_000_017, 0.5025), (10_000_019, 0.497)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adamw_constant_half_precision_within_1e_6(device, dtype, n, value, skip):
    """Summed in float32 too. (10^7 float16 values of 0.497: 128-term float32 runs per thread, as the
    first CUDA kernel summed them, are 1.9e-6 off.)"""
    got = adamw_penalty([torch.full((n,), value, device=device, dtype=dtype)], skip=skip)
    ref = exact_constant_sq_norm(value, n, dtype)
    assert abs(got - ref) / ref < 1e-6, (got, ref)


def test_adamw_many_constant_tensors_within_1e_6(device):
    """Many tensors in groups of their own weights, chunks of every size, mixed dtypes."""
    sizes = [1, 3, 8191, 8193, 16_385, 70_001, 1_000_001, 2_000_003]
    values = [0.3, 1.7, 0.5025, 2.0 / 3, 0.1, 5.5, 0.999, 0.5025]
    dtypes = [torch.float32] * 6 + [torch.bfloat16, torch.float16]
    weights = [0.5, 2.0, 1.0, 0.25, 3.0, 1.0, 0.75, 1.5]
    xs = [torch.full((n,), v, device=device, dtype=dt) for n, v, dt in zip(sizes, values, dtypes)]
    ref = sum(w * exact_constant_sq_norm(v, n, dt) for n, v, dt, w in zip(sizes, values, dtypes, weights))
    got = adamw_penalty(xs, weights)
    assert abs(got - ref) / ref < 1e-6, (got, ref)


# --- scales outside float32's range, overflowing products (issue 18 item 5) -----------------------

def expected_grad(g_old, p, scale):
    """g_old + scale * p computed in float64, then rounded to p's dtype once."""
    exact = scale * p.double()
    if g_old is not None:
        exact = exact + g_old.double()
    return exact.to(p.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_beyond_float32_gives_exact_grads(device, dtype):
    """2 * 1e39 does not fit a float32: computed as a float32 scale it became inf, and 0 * inf = nan."""
    p = torch.tensor([0.0, 1e-30, -2e-30], device=device, dtype=dtype)
    p.grad = None
    value = l2fast.l2_penalty_([p], 1e39)
    torch.testing.assert_close(p.grad, expected_grad(None, p, 2e39), rtol=0, atol=0)
    assert p.grad[0].item() == 0.0
    if dtype == torch.float32:
        assert p.grad.tolist() == pytest.approx([0.0, 2e9, -4e9], rel=1e-6)
        assert value.item() == pytest.approx(1e39 * (1e-60 + 4e-60), rel=1e-5)
    # accumulate mode: a zero param leaves its grad as it was
    g = torch.tensor([5.0, 1.0, -1.0], device=device, dtype=dtype)
    OPS.l2_penalty_([p], [g], 1e39, [])
    assert g[0].item() == 5.0 and torch.isfinite(g).all()


def test_scale_below_float32_normal_range_is_not_rounded(device):
    """A scale of 2e-45 is a float32 subnormal (2.8e-45 after rounding): 40% off if taken as one."""
    p = torch.tensor([1e30, 0.0, -3e25, 7.0], device=device)
    p.grad = None
    l2fast.l2_penalty_([p], 1e-45)
    torch.testing.assert_close(p.grad, expected_grad(None, p, 2e-45), rtol=1e-6, atol=0)


def test_half_zero_param_gets_zero_grad_under_overflowing_scale(device):
    """float16 cannot hold 2e39 * 1: that grad overflows to inf (the true value is beyond float16),
    but a zero param still gets exactly zero."""
    p = torch.tensor([0.0, 1.0, -1.0], device=device, dtype=torch.float16)
    p.grad = None
    l2fast.l2_penalty_([p], 1e39)
    assert p.grad.tolist() == [0.0, math.inf, -math.inf]


def test_float64_huge_scale_that_fits(device):
    p = torch.tensor([0.0, 1e-300, -1.0], device=device, dtype=torch.float64)
    p.grad = None
    l2fast.l2_penalty_([p], 8e307)  # 2 * weight = 1.6e308 still fits a float64
    assert p.grad.tolist() == [0.0, 1.6e8, -1.6e308]


@pytest.mark.parametrize("weight,weights,name", [
    (1e308, None, "weight"),                  # 2 * weight overflows float64
    (1e200, [1e200, 1.0], r"weights\[0\]"),   # weight * weights[0] overflows
    (-1e200, [1.0, -1e200], r"weights\[1\]"),
])
def test_overflowing_scale_is_refused_before_any_write(device, weight, weights, name):
    p = [torch.tensor([0.0, 1.0], device=device, dtype=torch.float64), torch.zeros(3, device=device, dtype=torch.float64)]
    g = [torch.full_like(t, 3.0) for t in p]
    with pytest.raises(ValueError, match=name + r".*overflows float64"):
        OPS.l2_penalty_(p, g, weight, [], weights)
    assert all(bool((t == 3.0).all()) for t in g)
    with pytest.raises(ValueError, match="overflows float64"):
        OPS.l2_penalty(p, weight, weights)


def test_negative_weights_are_allowed(device):
    """A negative weight subtracts its term (and pushes weights away from zero): accepted, as documented."""
    p = torch.tensor([1.0, -2.0, 0.5], device=device)
    p.grad = torch.zeros_like(p)
    value = l2fast.l2_penalty_([p], -0.25)
    assert value.item() == pytest.approx(-0.25 * 5.25)
    torch.testing.assert_close(p.grad, -0.5 * p)


finite_exponents = st.floats(min_value=-300, max_value=300)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(we=finite_exponents, wse=finite_exponents, sign=st.sampled_from([1.0, -1.0]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       fresh=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_any_finite_scale(we, wse, sign, dtype, fresh, seed):
    """For any weights: refused only when 2·weight·weights[0] overflows float64; otherwise zero params
    keep a zero contribution, and every grad is float64's answer rounded once (inf where it overflows)."""
    weight, w0 = sign * 10.0**we, 10.0**wse
    gen = torch.Generator().manual_seed(seed)
    mags = torch.empty(64, dtype=torch.float64).uniform_(-40, 40, generator=gen)
    p = (torch.randn(64, generator=gen, dtype=torch.float64).sign() * 10.0**mags).to(dtype)
    p[::5] = 0.0
    g_old = torch.randn(64, generator=gen).to(dtype)
    grads = [g_old.clone()]
    scale = 2.0 * weight * w0
    if not math.isfinite(scale):
        with pytest.raises(ValueError, match="overflows float64"):
            OPS.l2_penalty_([p], grads, weight, [0] if fresh else [], [w0])
        assert torch.equal(grads[0], g_old)
        return
    OPS.l2_penalty_([p], grads, weight, [0] if fresh else [], [w0])
    got = grads[0].double()
    old = None if fresh else g_old
    exact = scale * p.double() + (0.0 if old is None else old.double())
    expected = exact.to(dtype).double()
    zero = p == 0
    assert torch.equal(got[zero], (torch.zeros_like(got) if old is None else old.double())[zero])
    finfo = torch.finfo(dtype)
    near_limit = exact.abs() > 0.99 * finfo.max  # where rounding decides between max and inf
    ok = expected.isfinite() & ~near_limit
    assert torch.isinf(got[expected.isinf() & ~near_limit]).all()
    assert torch.equal(torch.sign(got[expected.isinf() & ~near_limit]), torch.sign(expected[expected.isinf() & ~near_limit]))
    bound = (scale * p.double()).abs() + (0.0 if old is None else old.double().abs())
    tol = (finfo.eps + 4 * torch.finfo(torch.float32 if dtype != torch.float64 else dtype).eps) * bound \
        + finfo.tiny * finfo.eps
    assert bool(((got - exact).abs()[ok] <= tol[ok]).all())


# --- where the tensors sit in memory (issue 17 item 4) ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_bits_do_not_depend_on_alignment(device, dtype):
    """The same values at every offset within 16 bytes: the same value bits, the same grad bits."""
    n = 70_001
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(n, generator=gen).to(dtype)
    old = torch.randn(n, generator=gen).to(dtype)
    small = torch.randn(33, generator=gen).to(dtype)
    results = []
    for offset in range(0, 16 // values.element_size() + 1):
        pbuf = torch.zeros(n + 16, dtype=dtype, device=device)
        gbuf = torch.zeros(n + 16, dtype=dtype, device=device)
        p = pbuf[offset:offset + n]
        g = gbuf[(offset * 3) % 5:(offset * 3) % 5 + n]  # its own offset: vector and element paths mixed
        p.copy_(values)
        g.copy_(old)
        q = small.to(device)
        gq = torch.zeros_like(q)
        v = OPS.l2_penalty_([p, q], [g, gq], 0.37, [])
        results.append((v.cpu(), g.cpu(), l2fast.sq_norm([q, p]).cpu()))
    for k, (v, g, s) in enumerate(results[1:], 1):
        assert torch.equal(v, results[0][0]), f"offset {k}: value {v.item()!r} != {results[0][0].item()!r}"
        assert torch.equal(g.view(torch.uint8), results[0][1].view(torch.uint8)), f"offset {k}: grads differ"
        assert torch.equal(s, results[0][2]), f"offset {k}: sq_norm differs"


def test_bits_do_not_depend_on_cpu_threads():
    xs = [torch.full((3_000_001,), 0.5025), torch.randn(70_000)]
    saved = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(l2fast.sq_norm(xs))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(o, outs[0]) for o in outs)


# --- the CUDA launch machinery (issue 17 items 1, 3, 4, 5): on a GPU only --------------------------

def _internal():
    if not l2fast.build_info().get("cuda"):
        pytest.skip("this l2fast build has no CUDA kernels")
    return torch.ops.l2fast_cuda


def test_cuda_build_exposes_its_counters():
    """Without a GPU too: the CUDA build registers its pool counter and grid limit."""
    ops = _internal()
    assert ops.pinned_table_bytes() >= ops.pinned_table_bytes(in_use=True) >= 0
    previous = ops.set_grid_limit(5)
    try:
        assert ops.set_grid_limit(5) == 5
    finally:
        ops.set_grid_limit(previous)


@pytest.mark.cuda
def test_bits_do_not_depend_on_the_grid():
    ops = _internal()
    gen = torch.Generator().manual_seed(9)
    cpu = [torch.randn(n, generator=gen) for n in (3_000_001, 5, 70_000, 1)] + [torch.randn(300, generator=gen)
                                                                                .half() for _ in range(40)]
    params = [t.cuda() for t in cpu]
    olds = [torch.randn(t.shape, generator=gen).to(t.dtype).cuda() for t in cpu]
    outs = []
    for limit in (0, 1, 2, 7, 100):
        previous = ops.set_grid_limit(limit)
        try:
            grads = [g.clone() for g in olds]
            v = OPS.l2_penalty_(params, grads, 0.37, [1])
            outs.append([v, *grads])
        finally:
            ops.set_grid_limit(previous)
    for k, out in enumerate(outs[1:], 1):
        for a, b in zip(outs[0], out):
            assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b), k


@pytest.mark.cuda
@pytest.mark.parametrize("n_tensors", [31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 671, 672, 673, 1500])
def test_every_table_size(n_tensors):
    gen = torch.Generator().manual_seed(n_tensors)
    cpu = [torch.randn(int(k), generator=gen) for k in torch.randint(1, 2000, (n_tensors,), generator=gen)]
    params = [t.cuda() for t in cpu]
    grads = [torch.ones_like(p) for p in params]
    value = OPS.l2_penalty_(params, grads, 0.5, [0])
    ref = 0.5 * sum((t.double() ** 2).sum().item() for t in cpu)
    assert value.item() == pytest.approx(ref, rel=1e-6)
    for i, (t, g) in enumerate(zip(cpu, grads)):
        torch.testing.assert_close(g.cpu(), (0 if i == 0 else 1) + t)


@pytest.mark.cuda
def test_cached_device_table_follows_changes():
    """A long list's device table is reused while its bytes are unchanged; any change (a new grad,
    another stream) must still give the right answer."""
    params = [torch.randn(50 + i % 7, device="cuda") for i in range(1000)]
    grads = [torch.zeros_like(p) for p in params]
    for rnd in range(3):
        v = OPS.l2_penalty_(params, grads, 0.5, [])
        assert v.item() == pytest.approx(0.5 * sum((p.double() ** 2).sum().item() for p in params), rel=1e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(g, 3 * p)
    grads[500] = torch.zeros_like(params[500])  # one new grad: the table changes
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        OPS.l2_penalty_(params, grads, 0.5, [])
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(grads[500], params[500])
    torch.testing.assert_close(grads[499], 4 * params[499])


@pytest.mark.cuda
def test_captured_tables_return_to_the_pool():
    ops = _internal()
    params = [torch.randn(64, device="cuda") for _ in range(1000)]
    grads = [torch.zeros_like(p) for p in params]
    OPS.l2_penalty_(params, grads, 0.5, [])

    def capture_and_drop():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            OPS.l2_penalty_(params, grads, 0.5, [])
        graph.replay()
        del graph
        gc.collect()

    def held_after_release():  # a graph's user object is released on a driver thread, a little later
        torch.cuda.synchronize()
        return _pool_in_use_after_release(ops)

    for _ in range(3):
        capture_and_drop()
    held, before = held_after_release(), ops.pinned_table_bytes()  # held: by other tests' live graphs
    for _ in range(50):
        capture_and_drop()
    assert held_after_release() == held  # every destroyed graph gave its table back
    # Bounded by the graphs alive at once (one here, a few while destructors are pending), not by
    # the number of captures: 50 captures leaking 64 KiB each would add 3.2 MB.
    assert 0 < before and ops.pinned_table_bytes() <= before + 8 * (64 << 10)
