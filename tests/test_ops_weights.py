"""Per-tensor weights (`float[]? weights`) on the three penalty ops, against float64 references."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_ops import RTOL, acc_dtype, hyp, tensor_lists

import l2fast.ops  # noqa: F401  (registers torch.ops.l2fast.*)

OPS = torch.ops.l2fast
WEIGHT_VALUES = st.sampled_from([0.0, 1.0, 0.5, 3.0, -0.25, 1e-3])


def ref_value(tensors, weight, ws):
    return weight * sum((w * (t.detach().double() ** 2).sum().item() for t, w in zip(tensors, ws)), 0.0)


def value_close(got, tensors, weight, ws):
    # Relative to the sum of the terms' magnitudes: with weights of both signs the terms can cancel,
    # and float32 sums are only as exact as their largest term.
    scale = weight * sum((abs(w) * (t.detach().double() ** 2).sum().item() for t, w in zip(tensors, ws)), 0.0)
    assert abs(got - ref_value(tensors, weight, ws)) <= 1e-5 * scale + 1e-30


def ref_grad(p, weight, w, base=None):
    out = 2 * weight * w * p.detach().double()
    return out if base is None else out + base.double()


def close(got, expected, dtype):
    torch.testing.assert_close(got.double(), expected.to(dtype).double(), rtol=2 * RTOL[dtype],
                               atol=1e-6 if dtype in (torch.float32, torch.float64) else 1e-2)


class TestWeightedValueAndGrad:
    @hyp
    @given(tensors=tensor_lists(), weight=st.floats(0, 10), data=st.data())
    def test_l2_penalty_matches_float64(self, tensors, weight, data):
        ws = data.draw(st.lists(WEIGHT_VALUES, min_size=len(tensors), max_size=len(tensors)), label="weights")
        params = [t.clone().requires_grad_() for t in tensors]
        value = OPS.l2_penalty(params, weight, ws)
        assert value.dtype == acc_dtype(tensors)
        value_close(value.item(), tensors, weight, ws)
        if not params:
            return
        value.backward()
        for p, w in zip(params, ws):
            assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
            close(p.grad, ref_grad(p, weight, w), p.dtype)

    @hyp
    @given(tensors=tensor_lists(), weight=st.floats(0, 10), data=st.data())
    def test_l2_penalty_inplace_matches_float64(self, tensors, weight, data):
        n = len(tensors)
        ws = data.draw(st.lists(WEIGHT_VALUES, min_size=n, max_size=n), label="weights")
        fresh = [i for i in range(n) if data.draw(st.booleans(), label=f"grads[{i}] fresh")]
        gen = torch.Generator().manual_seed(n)
        # real views as params, as in the other hypothesis tests; grads full of garbage when fresh
        grads = [torch.full(t.shape, float("nan")).to(t.dtype) if i in fresh
                 else torch.randn(t.shape, generator=gen).to(t.dtype) for i, t in enumerate(tensors)]
        before = [g.clone() for g in grads]
        value = OPS.l2_penalty_(tensors, grads, weight, fresh, ws)
        value_close(value.item(), tensors, weight, ws)
        for i, (p, g, g0, w) in enumerate(zip(tensors, grads, before, ws)):
            if w == 0.0 and i not in fresh:
                assert torch.equal(g, g0)  # left untouched, bit for bit
            elif w == 0.0:
                assert torch.equal(g, torch.zeros_like(g))  # a fresh grad is zero-filled
            else:
                close(g, ref_grad(p, weight, w, None if i in fresh else g0), p.dtype)

    @pytest.mark.parametrize("ws", [None, [1.0, 0.0, 2.5]])
    def test_backward_op(self, device, ws):
        params = [torch.randn(5, 5, device=device), torch.randn(3, device=device, dtype=torch.float16),
                  torch.randn(4, 6, device=device).t()]
        grads = OPS.l2_penalty_backward(torch.tensor(2.0, device=device), params, 0.25, ws)
        for p, g, w in zip(params, grads, ws or [1.0] * 3):
            assert g.shape == p.shape and g.dtype == p.dtype
            close(g.cpu(), ref_grad(p.cpu(), 0.5, w), p.dtype)

    def test_weighted_on_device(self, device):
        params = [torch.randn(70_001, device=device), torch.randn(3, device=device, dtype=torch.bfloat16),
                  torch.randn(40, 80, device=device)[:, ::2]]
        grads = [torch.ones_like(p) for p in params]
        ws = [2.0, 0.0, 0.5]
        value = OPS.l2_penalty_(params, grads, 0.1, [], ws)
        assert value.item() == pytest.approx(ref_value(params, 0.1, ws), rel=1e-6)
        for p, g, w in zip(params, grads, ws):
            close(g.cpu(), ref_grad(p.cpu(), 0.1, w, torch.ones(p.shape)), p.dtype)

    def test_zero_weight_tensor_is_not_read(self, device):
        """A tensor whose weight is 0 is not read: NaNs in it reach neither the value nor any grad."""
        bad = torch.full((1000,), float("nan"), device=device)
        good = torch.randn(10, device=device)
        g_bad, g_good = torch.full_like(bad, 7.0), torch.zeros_like(good)
        value = OPS.l2_penalty_([good, bad], [g_good, g_bad], 0.5, [], [1.0, 0.0])
        assert value.item() == pytest.approx(0.5 * (good.double() ** 2).sum().item(), rel=1e-6)
        assert torch.equal(g_bad, torch.full_like(bad, 7.0))
        value = OPS.l2_penalty_([good, bad], [g_good, g_bad], 0.5, [1], [1.0, 0.0])
        assert torch.equal(g_bad, torch.zeros_like(bad))
        assert math.isfinite(OPS.l2_penalty([good, bad], 0.5, [1.0, 0.0]).item())

    def test_none_is_all_ones(self, device):
        params = [torch.randn(100, device=device), torch.randn(7, 3, device=device)]
        assert torch.equal(OPS.l2_penalty(params, 0.3, None), OPS.l2_penalty(params, 0.3))
        assert torch.equal(OPS.l2_penalty(params, 0.3, [1.0, 1.0]), OPS.l2_penalty(params, 0.3))

    def test_old_call_forms(self):
        params, grads = [torch.randn(4)], [torch.zeros(4)]
        OPS.l2_penalty_(params, grads, 0.5, [])
        OPS.l2_penalty_(params, grads, 0.5)
        OPS.l2_penalty_(params, grads, 0.5, fresh=[0], weights=[2.0])
        torch.testing.assert_close(grads[0], 2.0 * params[0])


class TestWeightedAutograd:
    def test_gradcheck(self, device):
        params = [torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True).t(),
                  torch.randn(2, dtype=torch.float64, device=device, requires_grad=True),
                  torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)]
        fn = lambda *p: OPS.l2_penalty(p, 0.7, [0.5, 0.0, -2.0])  # noqa: E731
        assert torch.autograd.gradcheck(fn, params)
        assert torch.autograd.gradgradcheck(fn, params)

    def test_opcheck(self, device):
        params = [torch.randn(6, 2, device=device, requires_grad=True), torch.randn(3, device=device, requires_grad=True)]
        torch.library.opcheck(OPS.l2_penalty.default, (params, 0.5, [2.0, 0.0]))
        plain = [p.detach() for p in params]
        torch.library.opcheck(OPS.l2_penalty_backward.default, (torch.tensor(1.5, device=device), plain, 0.3, [0.0, 3.0]))
        grads = [torch.randn_like(p) for p in plain]
        torch.library.opcheck(OPS.l2_penalty_.default, (plain, grads, 0.5, [1], [0.0, 0.5]))

    def test_compile_fullgraph(self):
        model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        ws = [1.0, 0.0, 1.0, 0.0]  # decay the weights, not the biases
        x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))

        def loss_fn(x, y):
            return torch.nn.functional.cross_entropy(model(x), y) + OPS.l2_penalty(list(model.parameters()), 0.01, ws)

        eager = loss_fn(x, y)
        eager.backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(loss_fn, fullgraph=True)(x, y)
        compiled.backward()
        torch.testing.assert_close(compiled, eager)
        for p, g in zip(model.parameters(), eager_grads):
            torch.testing.assert_close(p.grad, g)


class TestBadWeights:
    """Rejected naming what was wrong, before anything is written."""

    @pytest.mark.parametrize("weight, ws, message", [
        (float("nan"), None, r"weight is nan; expected a finite number"),
        (float("inf"), None, r"weight is inf; expected a finite number"),
        (-float("inf"), [1.0, 1.0], r"weight is -inf"),
        (0.5, [1.0, float("nan")], r"weights\[1\] is nan; expected a finite number"),
        (0.5, [float("inf"), 1.0], r"weights\[0\] is inf"),
        (0.5, [1.0], r"got 1 weights for 2 params; expected one weight per param"),
        (0.5, [1.0, 1.0, 1.0], r"got 3 weights for 2 params"),
    ])
    def test_rejected_modifies_nothing(self, weight, ws, message):
        params, grads = [torch.randn(3), torch.randn(2)], [torch.ones(3), torch.ones(2)]
        with pytest.raises(ValueError, match=message):
            OPS.l2_penalty_(params, grads, weight, [], ws)
        assert all(torch.equal(g, torch.ones_like(g)) for g in grads)
        with pytest.raises(ValueError, match=message):
            OPS.l2_penalty(params, weight, ws)
        with pytest.raises(ValueError, match=message):
            OPS.l2_penalty_backward(torch.tensor(1.0), params, weight, ws)

    def test_rejected_when_traced(self):
        with pytest.raises(Exception, match=r"weights\[0\] is nan"):
            torch.compile(lambda p: OPS.l2_penalty([p], 0.5, [float("nan")]), fullgraph=True)(torch.randn(3))

    def test_empty_list_with_weights(self):
        with pytest.raises(ValueError, match="got 1 weights for 0 params"):
            OPS.l2_penalty([], 0.5, [1.0])
        assert OPS.l2_penalty([], 0.5, []).item() == 0.0
