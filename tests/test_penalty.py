"""Param groups, decay_groups and L2Penalty against float64 references (CPU); the penalty bench's CLI."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import l2fast
from l2fast import functional

hyp = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


class OpCalls(TorchDispatchMode):
    """Records every torch.ops.l2fast.* call with its tensor-list arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "l2fast":
            self.calls.append((func.__name__, args))
        return func(*args, **(kwargs or {}))


class FunctionCalls(TorchFunctionMode):
    """Records the name of every function a TorchFunctionMode sees."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def real_tensor(draw, dtype):
    """A param as real code has them: fresh, a slice of a bigger buffer, a transposed view, or empty."""
    kind = draw(st.sampled_from(["fresh", "slice", "transposed", "empty"]))
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "slice":
        t = torch.randn(rows * cols + 3, generator=gen, dtype=dtype)[3:].view(rows, cols)
    elif kind == "transposed":
        t = torch.randn(cols, rows, generator=gen, dtype=dtype).t()
    elif kind == "empty":
        t = torch.randn(0, cols, generator=gen, dtype=dtype)
    else:
        t = torch.randn(rows, cols, generator=gen, dtype=dtype)
    return t.requires_grad_()


@st.composite
def param_groups(draw):
    """(groups, default weight): 1-4 groups, weights 0 / positive / absent, grads None or present."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    groups = []
    for _ in range(draw(st.integers(1, 4))):
        params = [real_tensor(draw, dtype) for _ in range(draw(st.integers(0, 4)))]
        for p in params:
            if draw(st.booleans()):
                p.grad = torch.randn(p.shape, dtype=dtype)
        group = {"params": params}
        choice = draw(st.sampled_from(["zero", "value", "absent"]))
        if choice != "absent":
            group["weight"] = 0.0 if choice == "zero" else draw(st.floats(1e-4, 10.0))
        groups.append(group)
    return groups, draw(st.floats(1e-4, 10.0))


def reference(groups, default=None):
    """float64 value and the grads the penalty adds, per param (None for weight 0)."""
    value, added = 0.0, []
    for g in groups:
        w = g.get("weight", default)
        for p in g["params"]:
            value += w * (p.detach().double() ** 2).sum().item()
            added.append(2 * w * p.detach().double() if w != 0 else None)
    return value, added


def snapshot(groups):
    return [None if p.grad is None else p.grad.clone() for g in groups for p in g["params"]]


def assert_grads(groups, before, added):
    params = [p for g in groups for p in g["params"]]
    for i, (p, old, add) in enumerate(zip(params, before, added)):
        if add is None:  # weight 0: not read, not written
            assert (p.grad is None) if old is None else torch.equal(p.grad, old), f"param {i} was touched"
            continue
        want = add if old is None else old.double() + add
        torch.testing.assert_close(p.grad.double(), want, **TOL[p.dtype], msg=lambda m: f"param {i}: {m}")


def assert_value(got, want, dtype):
    assert got.shape == () and not got.requires_grad
    assert got.item() == pytest.approx(want, rel=TOL[dtype]["rtol"] * 10, abs=1e-9)


class TestParamGroups:
    @hyp
    @given(case=param_groups())
    def test_l2_penalty_inplace_matches_float64(self, case):
        groups, default = case
        dtype = next((p.dtype for g in groups for p in g["params"]), torch.float32)
        want, added = reference(groups, default)
        before = snapshot(groups)
        assert_value(functional.l2_penalty_(groups, default), want, dtype)
        assert_grads(groups, before, added)

    @hyp
    @given(case=param_groups())
    def test_differentiable_value_and_grads_match_float64(self, case):
        groups, default = case
        for g in groups:
            for p in g["params"]:
                p.grad = None
        want, added = reference(groups, default)
        value = l2fast.l2_penalty(groups, default)
        assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-9)
        if value.requires_grad:
            value.backward()
        assert_grads(groups, [None] * len(added), added)

    @hyp
    @given(case=param_groups())
    def test_l2penalty_object_matches_float64(self, case):
        groups, default = case
        dtype = next((p.dtype for g in groups for p in g["params"]), torch.float32)
        want, added = reference(groups, default)
        pen = l2fast.L2Penalty(groups, default)
        before = snapshot(groups)
        assert_value(pen.value(), want, dtype)
        for b, a in zip(before, snapshot(groups), strict=True):  # value() writes nothing
            assert (a is None) if b is None else torch.equal(a, b)
        assert_value(pen.add_grad_(), want, dtype)
        assert_grads(groups, before, added)

    def test_one_launch_for_all_groups_and_weight_zero_not_read(self):
        a, b, c, z = (torch.randn(4, 3, requires_grad=True) for _ in range(4))
        groups = [{"params": [a], "weight": 0.1}, {"params": [b, c], "weight": 0.3}, {"params": [z], "weight": 0.0}]
        for run in (lambda: l2fast.l2_penalty_(groups, None), l2fast.L2Penalty(groups).add_grad_):
            with OpCalls() as mode:
                run()
            read = [t for _, args in mode.calls for t in args[0]]
            assert all(t is not z for t in read), "the weight-0 group was passed to the kernel"
            assert [name for name, _ in mode.calls] == ["l2_penalty_.default"]
        assert z.grad is None

    def test_group_without_weight_takes_the_call_weight(self):
        a, b = torch.randn(5, requires_grad=True), torch.randn(2, 2, requires_grad=True)
        got = l2fast.l2_penalty_([{"params": [a]}, {"params": b, "weight": 2.0}], 0.5)
        want = 0.5 * (a.double() ** 2).sum() + 2.0 * (b.double() ** 2).sum()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(a.grad, 2 * 0.5 * a.detach())
        torch.testing.assert_close(b.grad, 2 * 2.0 * b.detach())

    BAD = {
        "non-numeric weight": (lambda a, b: [{"params": [a], "weight": 0.1}, {"params": [b], "weight": "0.1"}],
                               TypeError, r"params\[1\]\['weight'\] is a str"),
        "bool weight": (lambda a, b: [{"params": [a], "weight": True}], TypeError,
                        r"params\[0\]\['weight'\] is a bool"),
        "nan weight": (lambda a, b: [{"params": [a], "weight": 0.1}, {"params": [b], "weight": math.nan}],
                       ValueError, r"params\[1\]\['weight'\] is nan"),
        "param in two groups": (lambda a, b: [{"params": [a, b], "weight": 0.1}, {"params": [a], "weight": 0.0}],
                                ValueError, r"params\[1\]\['params'\]\[0\] is also params\[0\]\['params'\]\[0\]"),
        "unknown key": (lambda a, b: [{"params": [a], "weight": 0.1}, {"params": [b], "wieght": 0.0}],
                        ValueError, "unknown key 'wieght'"),
        "non-tensor": (lambda a, b: [{"params": [a], "weight": 0.1}, {"params": [b, 3.0], "weight": 0.2}],
                       TypeError, r"params\[1\]\['params'\]\[1\] is a float"),
        "no params": (lambda a, b: [{"params": [a], "weight": 0.1}, {"weight": 0.2}], ValueError, "has no 'params'"),
        "a set": (lambda a, b: [{"params": {a, b}, "weight": 0.1}], TypeError, "is a set"),
        "tensors and groups mixed": (lambda a, b: [{"params": [a], "weight": 0.1}, b], TypeError,
                                     r"params\[1\] is a Tensor but other elements are param groups"),
        "no weight anywhere": (lambda a, b: [{"params": [a], "weight": 0.1}, {"params": [b]}], TypeError,
                               r"params\[1\] has no 'weight'"),
    }

    @pytest.mark.parametrize("case", list(BAD))
    @pytest.mark.parametrize("api", ["l2_penalty_", "l2_penalty", "L2Penalty"])
    def test_bad_group_rejected_before_anything_is_written(self, case, api):
        make, error, match = self.BAD[case]
        a, b = torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)
        a.grad = torch.ones(3, 2)
        groups = make(a, b)
        with pytest.raises(error, match=match):
            if api == "L2Penalty":
                l2fast.L2Penalty(groups).add_grad_()
            else:
                getattr(l2fast, api)(groups, None)
        assert torch.equal(a.grad, torch.ones(3, 2)) and b.grad is None

    def test_groups_shared_with_torch_optim(self):
        """AdamW keeps "weight" as an unused key and adds its own keys to the dicts; both still work."""
        model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
        groups = l2fast.decay_groups(model, 0.01)
        opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
        assert [g["weight"] for g in opt.param_groups] == [0.01, 0.0] and "lr" in groups[0]
        pen = l2fast.L2Penalty(groups)
        model(torch.randn(5, 4)).sum().backward()
        want = 0.01 * sum((p.detach().double() ** 2).sum().item() for p in groups[0]["params"])
        assert pen.add_grad_().item() == pytest.approx(want, rel=1e-6)
        opt.step()


class TestBadInput:
    """Issue 9 item 10, Python side: each message names what was wrong and where."""

    @pytest.mark.parametrize("api", ["l2_penalty_", "l2_penalty", "sq_norm"])
    def test_non_tensor_names_its_index(self, api):
        # Before: l2_penalty_ raised AttributeError: 'float' object has no attribute 'grad'.
        params = [torch.randn(3, requires_grad=True), 0.5]
        call = getattr(l2fast, api)
        with pytest.raises(TypeError, match=r"params\[1\] is a float; expected a torch.Tensor"
                           if api != "sq_norm" else r"tensors\[1\] is a float"):
            call(params) if api == "sq_norm" else call(params, 0.1)
        assert params[0].grad is None

    @pytest.mark.parametrize("make, layout", [
        (lambda: torch.randn(4, 3).to_sparse(), "sparse_coo"),
        (lambda: torch.randn(4, 3).to_sparse_csr(), "sparse_csr"),
    ])
    @pytest.mark.parametrize("api", ["l2_penalty_", "l2_penalty", "sq_norm"])
    @pytest.mark.filterwarnings("ignore::UserWarning")
    def test_sparse_names_its_layout(self, make, layout, api):
        # Before: "params[0] is on cpu; l2fast has kernels for cpu ... tensors only".
        t = make()
        call = getattr(l2fast, api)
        with pytest.raises(ValueError, match=rf"\[0\] is a {layout} tensor; l2fast's kernels take dense"):
            call([t]) if api == "sq_norm" else call([t], 0.1)

    @pytest.mark.filterwarnings("ignore::UserWarning")
    def test_quantized_names_it(self):
        q = torch.quantize_per_tensor(torch.randn(5), 0.1, 0, torch.qint8)
        with pytest.raises(ValueError, match=r"params\[0\] is a quantized tensor \(torch.qint8\)"):
            l2fast.l2_penalty_([q], 0.1)

    @pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
    @pytest.mark.parametrize("api", ["l2_penalty_", "l2_penalty", "L2Penalty"])
    def test_non_finite_weight_rejected_naming_it(self, weight, api):
        # Before: a NaN weight was accepted and NaN went into every grad.
        p = torch.randn(3, requires_grad=True)
        with pytest.raises(ValueError, match=f"weight is {weight}; expected a finite real number"):
            if api == "L2Penalty":
                l2fast.L2Penalty([p], weight)
            else:
                getattr(l2fast, api)([p], weight)
        assert p.grad is None


class TestDecayGroups:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)
            self.norm = nn.LayerNorm(4)
            self.norm2d = nn.LayerNorm([2, 4])  # a 2-D weight that is still a norm parameter
            self.fc = nn.Linear(4, 10)
            self.head = nn.Linear(10, 10, bias=False)
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)
            self.scale = nn.Parameter(torch.ones(()))

    def names(self, model, group):
        ids = {id(p) for p in group["params"]}
        return sorted(n for n, p in model.named_parameters() if id(p) in ids)

    def test_nanogpt_rule(self):
        model = self.Net()
        decay, no_decay = l2fast.decay_groups(model, 0.1)
        assert decay["weight"] == 0.1 and no_decay["weight"] == 0.0
        assert self.names(model, decay) == ["conv.weight", "embed.weight", "fc.weight", "head.weight"]
        assert self.names(model, no_decay) == ["bn.bias", "bn.weight", "conv.bias", "fc.bias", "norm.bias",
                                               "norm.weight", "norm2d.bias", "norm2d.weight", "scale"]

    def test_tied_parameter_listed_once(self):
        model = self.Net()
        model.head = nn.Linear(4, 10, bias=False)
        model.head.weight = model.embed.weight  # weight tying, as in GPT
        decay, _ = l2fast.decay_groups(model, 0.1)
        assert sum(p is model.embed.weight for p in decay["params"]) == 1

    def test_exclude(self):
        model = self.Net()
        decay, no_decay = l2fast.decay_groups(model, 0.1, exclude=lambda name, p: name.startswith("embed"))
        assert "embed.weight" in self.names(model, no_decay) and "embed.weight" not in self.names(model, decay)

    def test_bad_arguments(self):
        with pytest.raises(TypeError, match="exclude is a int"):
            l2fast.decay_groups(self.Net(), 0.1, exclude=3)
        with pytest.raises(ValueError, match="weight is nan"):
            l2fast.decay_groups(self.Net(), math.nan)
        with pytest.raises(TypeError, match="model is a list"):
            l2fast.decay_groups([torch.randn(2, 2)], 0.1)

    def test_feeds_torch_optim_and_the_penalty(self):
        model = self.Net()
        groups = l2fast.decay_groups(model, 0.1)
        opt = torch.optim.SGD(groups, lr=0.1)
        pen = l2fast.L2Penalty(groups)
        x = model.fc(model.norm(model.embed(torch.tensor([1, 2, 3])))).sum()
        x.backward()
        want = 0.1 * sum((p.detach().double() ** 2).sum().item() for p in groups[0]["params"])
        assert pen.add_grad_().item() == pytest.approx(want, rel=1e-6)
        opt.step()


class TestL2Penalty:
    def test_across_steps_with_fresh_grads(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        groups = l2fast.decay_groups(model, 1e-2)
        opt = torch.optim.SGD(groups, lr=0.1)
        pen = l2fast.L2Penalty(groups)
        for step in range(4):
            opt.zero_grad(set_to_none=True)
            loss = model(torch.randn(3, 6)).square().mean()
            loss.backward()
            data = [p.grad.clone() for g in groups for p in g["params"]]
            want, added = reference(groups)
            if step == 2:  # a step where backward produced no grads at all
                opt.zero_grad(set_to_none=True)
                data = [None] * len(data)
            assert pen.add_grad_().item() == pytest.approx(want, rel=1e-6)
            assert_grads(groups, data, added)
            opt.step()

    def test_swapped_params_are_followed(self):
        a, b = torch.randn(3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
        groups = [{"params": [a], "weight": 0.1}, {"params": [b], "weight": 0.0}]
        pen = l2fast.L2Penalty(groups)

        def check():
            for p in (a, b, *(p for g in groups for p in g["params"])):
                p.grad = None
            want, added = reference(groups)
            assert pen.value().item() == pytest.approx(want, rel=1e-6)
            assert pen.add_grad_().item() == pytest.approx(want, rel=1e-6)
            assert_grads(groups, [None] * len(added), added)

        check()
        with torch.no_grad():
            a.data = torch.randn(2, 5)  # new storage and shape behind the same object
        check()
        torch.utils.swap_tensors(a, torch.randn(3, 3, requires_grad=True))
        check()
        groups[0]["params"][0] = torch.randn(7, requires_grad=True)  # an element replaced in place
        check()
        groups[0]["params"].append(torch.randn(2, requires_grad=True))
        check()
        groups[1]["weight"] = 0.5  # the weight-0 group becomes penalised
        check()
        groups[0]["params"] = [torch.randn(1, 4, requires_grad=True)]  # a new list
        check()
        # As with torch.optim, the group dicts are shared but the list of groups is the penalty's own.
        pen.param_groups.append({"params": [torch.randn(3, requires_grad=True)], "weight": 2.0})
        groups = pen.param_groups
        check()
        pen.param_groups[0] = {"params": [torch.randn(2, 2, requires_grad=True)], "weight": 0.3}  # a group replaced
        check()

    def test_weight_change_and_plain_list(self):
        ps = [torch.randn(5, requires_grad=True), torch.randn(2, 3, requires_grad=True)]
        pen = l2fast.L2Penalty(ps, 0.25)
        want = 0.25 * sum((p.double() ** 2).sum().item() for p in ps)
        assert pen.add_grad_().item() == pytest.approx(want, rel=1e-6)
        pen.weight = 0.5
        assert pen.value().item() == pytest.approx(2 * want, rel=1e-6)
        with pytest.raises(TypeError, match="no weight given"):
            l2fast.L2Penalty(ps)

    def test_prepared_once(self):
        ps = [torch.randn(5, requires_grad=True)]
        pen = l2fast.L2Penalty([{"params": ps, "weight": 0.1}])
        parts = pen._parts
        for _ in range(3):
            pen.add_grad_()
        assert pen._parts is parts  # nothing rebuilt while nothing changed

    def test_differentiable_term(self):
        ps = [torch.randn(4, 2, requires_grad=True), torch.randn(3, requires_grad=True)]
        pen = l2fast.L2Penalty([{"params": [ps[0]], "weight": 0.2}, {"params": [ps[1]], "weight": 0.0}])
        term = pen()
        assert term.requires_grad
        (term * 3).backward()
        torch.testing.assert_close(ps[0].grad, 3 * 2 * 0.2 * ps[0].detach())
        assert ps[1].grad is None

    def test_all_weights_zero(self):
        p = torch.randn(3, dtype=torch.float64, requires_grad=True)
        pen = l2fast.L2Penalty([{"params": [p], "weight": 0.0}])
        v = pen.add_grad_()
        assert v.item() == 0.0 and v.dtype == torch.float64 and p.grad is None

    def test_bad_grad_rejected_before_anything_is_written(self):
        a, b = torch.randn(3, requires_grad=True), torch.randn(4, requires_grad=True)
        a.grad, b.grad = torch.ones(3), torch.ones(4)
        b.data = torch.randn(5)  # the param changed shape; its old grad no longer fits
        pen = l2fast.L2Penalty([{"params": [a], "weight": 0.1}, {"params": [b], "weight": 0.2}])
        with pytest.raises(ValueError, match=r"grads\[1\]|params\[1\]\['params'\]\[0\]"):
            pen.add_grad_()
        assert torch.equal(a.grad, torch.ones(3))

    def test_import_l2fast_stays_torch_free(self):
        import subprocess
        import sys

        code = "import sys, l2fast; assert 'torch' not in sys.modules; print(l2fast.__all__)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "L2Penalty" in out.stdout and "decay_groups" in out.stdout


class TestDirectCall:
    """L2Penalty.add_grad_ runs the kernel without the dispatcher (l2fast._C._add_grad_) when the
    tensors are plain and no mode is active, and skips the checks when the tensors are the ones the
    last call checked. Every change between calls must still be seen, and the result is the op's."""

    def params(self, gen):
        """Params as models hold them: a plain matrix, a slice of a bigger buffer, a transposed view."""
        return [torch.randn(6, 5, generator=gen).requires_grad_(),
                torch.randn(41, generator=gen)[1:].view(8, 5).requires_grad_(),
                torch.randn(5, 7, generator=gen).t().requires_grad_()]

    def test_taken_for_plain_tensors_and_not_under_a_mode(self):
        gen = torch.Generator().manual_seed(0)
        ps = self.params(gen)
        pen = l2fast.L2Penalty([{"params": ps[:2], "weight": 0.5}, {"params": ps[2:], "weight": 0.25}])
        assert pen._direct is not None
        assert l2fast._C._add_grad_(pen.param_groups, *pen._direct) is not None  # taken: the grads were made
        assert all(p.grad is not None for p in ps)
        before = [p.grad.clone() for p in ps]
        with OpCalls() as mode:  # a TorchDispatchMode must see the op: the direct call steps aside
            assert l2fast._C._add_grad_(pen.param_groups, *pen._direct) is None
            assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))  # and wrote nothing
            pen.add_grad_()
        assert [name for name, _ in mode.calls] == ["l2_penalty_.default"]
        with torch.inference_mode():
            assert l2fast._C._add_grad_(pen.param_groups, *pen._direct) is None
        with FunctionCalls() as mode:  # a TorchFunctionMode sees torch.ops calls too
            assert l2fast._C._add_grad_(pen.param_groups, *pen._direct) is None
            pen.add_grad_()
        assert "l2fast.l2_penalty_.default" in mode.calls

    def test_steps_aside_for_a_torch_function_subclass(self):
        class Logged(torch.Tensor):
            calls = []

            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                cls.calls.append(str(func))
                return super().__torch_function__(func, types, args, kwargs)

        ps = [torch.randn(3, requires_grad=True), torch.randn(4).as_subclass(Logged).requires_grad_()]
        pen = l2fast.L2Penalty(ps, 0.5)
        assert l2fast._C._add_grad_(pen.param_groups, *pen._direct) is None
        want = 0.5 * sum((p.detach().double() ** 2).sum().item() for p in ps)
        assert pen.add_grad_().item() == pytest.approx(want, rel=1e-6)
        assert "l2fast.l2_penalty_.default" in Logged.calls

    def test_same_bits_as_the_op(self):
        gen = torch.Generator().manual_seed(1)
        ps = self.params(gen)
        ps[0].grad = torch.randn(ps[0].shape, generator=gen)
        ps[2].grad = torch.randn(ps[2].shape, generator=gen).t().contiguous().t()  # p's strides
        groups = [{"params": ps[:2], "weight": 0.5}, {"params": ps[2:], "weight": 0.25}]
        qs = [p.detach().clone().requires_grad_() for p in ps]
        for p, q in zip(ps, qs):
            q.grad = None if p.grad is None else p.grad.clone()
        pen = l2fast.L2Penalty(groups)
        for _ in range(3):  # the first call checks and remembers; the next ones reuse it
            got = pen.add_grad_()
            with OpCalls():  # the same penalty through torch.ops
                want = l2fast.L2Penalty([{"params": qs[:2], "weight": 0.5}, {"params": qs[2:], "weight": 0.25}]).add_grad_()
            assert torch.equal(got, want)
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))

    def test_grad_versions_bumped(self):
        p = torch.randn(4, requires_grad=True)
        p.grad = torch.zeros(4)
        pen = l2fast.L2Penalty([p], 0.1)
        for _ in range(3):
            v = p.grad._version
            pen.add_grad_()
            assert p.grad._version == v + 1

    STEPS = ["call", "none", "new_data", "new_shape", "edit", "shared_grad", "grad_moved", "grad_is_param",
             "strided_grad", "grad_requires_grad", "param_dtype", "self_overlap", "one_memory", "interleaved"]

    @hyp
    @given(st.lists(st.sampled_from(STEPS), min_size=1, max_size=14), st.integers(0, 2**31 - 1))
    def test_every_change_between_calls_is_seen(self, steps, seed):
        gen = torch.Generator().manual_seed(seed)
        ps = self.params(gen)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        pen = l2fast.L2Penalty(ps, 0.3)
        pen.add_grad_()
        for step in steps:
            i = int(torch.randint(len(ps), (), generator=gen))
            j = (i + 1) % len(ps)
            p, error = ps[i], None
            with torch.no_grad():
                if step == "none":
                    p.grad = None
                elif step == "new_data":  # new storage behind the same object
                    p.data = torch.randn(p.shape, generator=gen)
                elif step == "new_shape":  # and a new shape: the old grad no longer fits
                    p.data = torch.randn(p.numel() + 1, generator=gen)
                    error = r"has shape"
                elif step == "edit":  # new values in the same memory
                    p.mul_(-2)
                elif step == "shared_grad":  # two grads overlapping by one element
                    buf = torch.zeros(200)
                    nj = ps[j].numel()
                    ps[j].grad = buf[:nj].view(ps[j].shape)
                    p.grad = buf[nj - 1:nj - 1 + p.numel()].view(p.shape)
                    error = r"shares memory with grads\["
                elif step == "grad_moved" and p.grad is not None and ps[j].grad is not None:
                    # the same grad object moved onto another grad's memory: only its storage changed
                    other = ps[j].grad
                    n = min(p.numel(), other.numel())
                    p.data = p.data.reshape(-1)[:n].clone()
                    p.grad = torch.zeros(n)
                    pen.add_grad_()  # checked and remembered with the grad in its own memory
                    p.grad.set_(other.untyped_storage(), other.storage_offset(), (n,), (1,))
                    error = rf"grads\[{max(i, j)}\] shares memory with grads\[{min(i, j)}\]"
                elif step == "grad_is_param":
                    p.grad = p.detach()
                    error = rf"grads\[{i}\] shares memory with params\[{i}\]"
                elif step == "strided_grad":  # not walkable with p's strides: a stand-in, copied back
                    p.grad = torch.randn(*p.shape, 2, generator=gen)[..., 1]
                elif step == "self_overlap":  # elements i + j of one buffer (or one element, when 1-D)
                    p.grad = torch.zeros(p.numel()).as_strided(p.shape, [1] * p.dim() if p.dim() > 1 else [0])
                    error = rf"grads\[{i}\] has elements that share memory"
                elif step == "one_memory":  # two storage objects on one numpy array
                    mem = np.zeros(p.numel() + ps[j].numel() - 1, np.float32)  # one element in common
                    ps[j].grad = torch.from_numpy(mem)[:ps[j].numel()].view(ps[j].shape)
                    p.grad = torch.from_numpy(mem)[-p.numel():].view(p.shape)
                    error = rf"grads\[{max(i, j)}\] shares memory with grads\[{min(i, j)}\]"
                elif step == "interleaved":  # legal: every other element of one buffer each
                    buf = torch.randn(2 * max(p.numel(), ps[j].numel()), generator=gen)
                    p.grad = buf[0::2][:p.numel()].view(p.shape)
                    ps[j].grad = buf[1::2][:ps[j].numel()].view(ps[j].shape)
                elif step == "grad_requires_grad":
                    p.grad = torch.zeros(p.shape, requires_grad=True)
                    error = r"requires grad"
                elif step == "param_dtype":  # the param becomes float64; its float32 grad no longer fits
                    if p.grad is None:
                        p.grad = torch.zeros(p.shape)
                    p.data = p.data.double()
                    error = r"has dtype"
            before = [None if q.grad is None else q.grad.clone() for q in ps]
            if error:
                with pytest.raises((ValueError, TypeError), match=error):
                    pen.add_grad_()
                for q, b in zip(ps, before):  # nothing written
                    assert (q.grad is None) if b is None else torch.equal(q.grad, b)
                p.data = p.data.float()  # repaired for the next step
                p.grad = torch.zeros(p.shape)
                if step == "grad_moved":
                    ps[j].grad = torch.zeros(ps[j].shape)
                if step in ("shared_grad", "one_memory"):
                    ps[j].grad = torch.zeros(ps[j].shape)
                continue
            want, added = reference([{"params": ps}], 0.3)
            assert_value(pen.add_grad_(), want, torch.float32)
            assert_grads([{"params": ps}], before, added)


class TestWeightZeroIsNotRead:
    """Issue 18 item 6: a tensor of effective weight 0 is not read by any entry point (a NaN in it
    reaches nothing), its grad is left as it is, and every entry point gives the same 0 value, of
    the same dtype and device."""

    def params(self, device):
        p = torch.tensor([math.nan, 1.0], device=device, requires_grad=True)
        q = torch.tensor([2.0, math.inf], dtype=torch.float64, device=device, requires_grad=True)
        return p, q

    def check_value(self, value, device):
        assert value.shape == () and value.item() == 0.0
        assert value.dtype == torch.float64 and value.device.type == device  # float64: q is float64

    @pytest.mark.parametrize("api", ["l2_penalty_", "L2Penalty", "l2_penalty_ groups", "L2Penalty groups"])
    def test_add_grad_leaves_grads_alone(self, api, device):
        # Before: l2fast.l2_penalty_([p], 0.0) gave NaN and wrote 0 * NaN into p.grad.
        p, q = self.params(device)
        p.grad = torch.full((2,), 3.0, device=device)
        params = [p, q] if "groups" not in api else [{"params": [p], "weight": 0.0}, {"params": [q], "weight": 0.0}]
        for _ in range(2):  # L2Penalty: the first call and the cached one
            value = (l2fast.l2_penalty_(params, 0.0) if api.startswith("l2_penalty_")
                     else l2fast.L2Penalty(params, 0.0).add_grad_())
            self.check_value(value, device)
            assert torch.equal(p.grad, torch.full((2,), 3.0, device=device)) and q.grad is None

    @pytest.mark.parametrize("groups", [False, True])
    def test_value_and_differentiable_term(self, groups, device):
        p, q = self.params(device)
        params = [{"params": [p, q], "weight": 0.0}] if groups else [p, q]
        for value in (l2fast.l2_penalty(params, 0.0), l2fast.L2Penalty(params, 0.0).value(),
                      l2fast.L2Penalty(params, 0.0)()):
            self.check_value(value, device)
        assert p.grad is None and q.grad is None

    def test_ops(self, device):
        p, q = (t.detach() for t in self.params(device))
        ops = torch.ops.l2fast
        for value in (ops.l2_penalty([p, q], 0.0), ops.l2_penalty([p, q], 0.5, [0.0, 0.0]),
                      ops.l2_penalty([p, q], 0.0, [1.0, 2.0])):
            self.check_value(value, device)
        for grads in (ops.l2_penalty_backward(torch.tensor(1.0), [p, q], 0.0),
                      ops.l2_penalty_backward(torch.tensor(1.0), [p, q], 2.0, [0.0, 0.0])):
            assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(grads, (p, q)))
        gp, gq = torch.full_like(p, 3.0), torch.full_like(q, 4.0)
        self.check_value(ops.l2_penalty_([p, q], [gp, gq], 0.0), device)
        assert torch.equal(gp, torch.full_like(p, 3.0)) and torch.equal(gq, torch.full_like(q, 4.0))
        self.check_value(ops.l2_penalty_([p, q], [gp, gq], 0.0, [1]), device)  # a fresh grad: zero-filled
        assert torch.equal(gp, torch.full_like(p, 3.0)) and torch.equal(gq, torch.zeros_like(q))

    def test_sq_norm_types_its_value_alike(self, device):
        empty = [torch.zeros(0, device=device), torch.zeros(0, 3, dtype=torch.float64, device=device)]
        for value in (l2fast.sq_norm(empty), torch.ops.l2fast.sq_norm(empty)):
            self.check_value(value, device)


class TestAfterConstruction:
    """Issue 18 items 14-17: keys added later, copies, torch.compile, omitted weights, huge weights."""

    def test_unknown_key_added_later_is_an_error(self):
        # Before: ignored (the watch did not look at the keys).
        a, b = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
        groups = [{"params": [a], "weight": 0.1}, {"params": [b], "weight": 0.2}]
        opt = torch.optim.SGD(groups, lr=0.1)
        pen = l2fast.L2Penalty(groups)
        a.grad = torch.ones(3)
        pen.add_grad_()
        for change in ("add", "swap"):
            if change == "add":
                groups[0]["wieght"] = 0.5
            else:  # same number of keys: one of the optimizer's replaced by a typo
                del groups[0]["wieght"], groups[1]["momentum"]
                groups[1]["wieght"] = 0.5
            before = [a.grad.clone(), b.grad.clone()]
            for call in (pen.add_grad_, pen.value, pen):
                with pytest.raises(ValueError, match=r"params\[\d\] has the unknown key 'wieght'"):
                    call()
            assert torch.equal(a.grad, before[0]) and torch.equal(b.grad, before[1])
        del groups[1]["wieght"]
        groups[1]["momentum"] = 0.0
        assert pen.add_grad_().item() == pytest.approx(0.1 * (a.double() ** 2).sum().item() +
                                                       0.2 * (b.double() ** 2).sum().item(), rel=1e-6)
        opt.step()

    def test_deepcopy_penalises_the_copies(self):
        # Before: TypeError: cannot pickle 'PyCapsule' object.
        import copy

        model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
        pen = l2fast.L2Penalty(l2fast.decay_groups(model, 0.1))
        pen.add_grad_()
        both = copy.deepcopy({"model": model, "penalty": pen})
        model2, pen2 = both["model"], both["penalty"]
        assert pen2.param_groups[0]["params"][0] is model2[0].weight  # the copied model's own tensor
        with torch.no_grad():
            model[0].weight.mul_(2)
        want = 0.1 * (model2[0].weight.double() ** 2).sum().item()
        model2.zero_grad(set_to_none=True)
        assert pen2.add_grad_().item() == pytest.approx(want, rel=1e-6)
        torch.testing.assert_close(model2[0].weight.grad, 0.2 * model2[0].weight.detach())
        assert model2[0].bias.grad is None and pen2.weight is None

    def test_pickle_round_trip(self):
        import pickle

        ps = [torch.randn(5, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
        pen = l2fast.L2Penalty(ps, 0.25)
        pen2 = pickle.loads(pickle.dumps(pen))
        assert pen2.weight == 0.25 and torch.equal(pen2.value(), pen.value())
        pen2.add_grad_()
        assert all(p.grad is None for p in ps)

    def test_weight_may_be_omitted_with_groups(self):
        # Before: TypeError: missing 1 required positional argument: 'weight'.
        a, b = torch.randn(3, requires_grad=True), torch.randn(4, requires_grad=True)
        groups = [{"params": [a], "weight": 0.5}, {"params": [b], "weight": 0.0}]
        want = 0.5 * (a.double() ** 2).sum().item()
        assert l2fast.l2_penalty_(groups).item() == pytest.approx(want, rel=1e-6)
        assert l2fast.l2_penalty(groups).item() == pytest.approx(want, rel=1e-6)
        for api in (l2fast.l2_penalty_, l2fast.l2_penalty):
            with pytest.raises(TypeError, match="no weight given"):
                api([a, b])
            with pytest.raises(TypeError, match=r"params\[1\] has no 'weight'"):
                api([{"params": [a], "weight": 0.5}, {"params": [b]}])

    @pytest.mark.parametrize("api", ["l2_penalty_", "l2_penalty", "L2Penalty", "group", "decay_groups"])
    def test_weight_beyond_float_is_one_line(self, api):
        # Before: a bare OverflowError: int too large to convert to float.
        p = torch.randn(3, requires_grad=True)
        where = r"params\[0\]\['weight'\]" if api == "group" else "weight"
        with pytest.raises(ValueError, match=rf"{where} is 100000000000\.\.\. \(401 characters\), beyond the "
                           "float range; expected a finite real number"):
            if api == "L2Penalty":
                l2fast.L2Penalty([p], 10**400)
            elif api == "group":
                l2fast.l2_penalty_([{"params": [p], "weight": 10**400}])
            elif api == "decay_groups":
                l2fast.decay_groups(nn.Linear(2, 2), 10**400)
            else:
                getattr(l2fast, api)([p], 10**400)
        assert p.grad is None

    @pytest.mark.slow
    def test_compiled_step_builds_once(self):
        # Before: the penalty was rebuilt on every step, with a Dynamo warning about _C._validated.
        import warnings

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        groups = l2fast.decay_groups(model, 1e-2)
        pen = l2fast.L2Penalty(groups)
        opt = torch.optim.SGD(groups, lr=0.1)  # adds its keys to the groups: the penalty must follow once
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm.forward

        def step(x, y):
            loss = nn.functional.cross_entropy(model(x), y)
            return loss.detach() + pen.add_grad_(), pen().detach()

        compiled = torch.compile(step, backend=backend)
        parts = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(5):
                opt.zero_grad()
                x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
                total, term = compiled(x, y)
                want, added = reference(groups)
                assert total.item() == pytest.approx(nn.functional.cross_entropy(model(x), y).item() + want, rel=1e-5)
                assert term.item() == pytest.approx(want, rel=1e-5)
                assert_grads(groups, [None] * len(added), added)
                parts.append(pen._parts)
                if i == 1:
                    compiled_by_then = len(graphs)
                opt.step()
        assert all(p is parts[0] for p in parts), "rebuilt after the first step"
        assert len(graphs) == compiled_by_then, "recompiled in the steady state"
        assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message) for w in caught]
        groups[0]["weight"] = 0.5  # a change is still followed
        opt.zero_grad()
        x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
        want, _ = reference(groups)
        assert compiled(x, y)[1].item() == pytest.approx(want, rel=1e-5)
        torch._dynamo.reset()
        fullgraph = torch.compile(lambda: pen.add_grad_(), fullgraph=True)  # nothing changed: one graph
        opt.zero_grad()
        assert fullgraph().item() == pytest.approx(want, rel=1e-5)


class TestBenchCLI:
    @pytest.mark.parametrize("argv, match", [
        (["--tensors", "0"], "--tensors 0"),
        (["--rounds", "0"], "--rounds 0"),
        (["--device", "meta"], "--device meta"),
        (["--device", "nonsense"], "--device nonsense"),
        (["--sizes", "2M"], "unknown size '2M'"),
    ])
    def test_bad_options_are_one_line_exit_2(self, argv, match, capsys):
        from l2fast.bench.__main__ import cli

        assert cli(["penalty", *argv]) == 2
        err = capsys.readouterr().err
        errors = err.splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: ") and match in errors[0], err
