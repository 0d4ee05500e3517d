"""The fused L2 ops against float64 references: one class per op, CPU and CUDA."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import l2fast
import l2fast.ops  # noqa: F401  (registers torch.ops.l2fast.*)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def ref_sq_norm(tensors):
    return sum(((t.detach().double() ** 2).sum().item() for t in tensors), 0.0)


def acc_dtype(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@st.composite
def tensor_lists(draw, max_tensors=8):
    """Lists of tensors with random shapes (zero-size included), dtypes and layouts."""
    out = []
    for _ in range(draw(st.integers(0, max_tensors))):
        shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
        dtype = draw(st.sampled_from(DTYPES))
        layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "offset"]))
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        if layout == "strided" and shape:
            t = torch.randn([*shape[:-1], shape[-1] * 2], generator=gen)[..., ::2]
        elif layout == "offset":
            t = torch.randn(int(torch.tensor(shape).prod()) + 1, generator=gen)[1:].reshape(shape)
        else:
            t = torch.randn(shape, generator=gen)
            if layout == "transposed" and len(shape) >= 2:
                t = t.transpose(0, -1)
        out.append(t.to(dtype))
    return out


hyp = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TestSqNorm:
    @hyp
    @given(tensors=tensor_lists())
    def test_matches_float64_reference(self, tensors):
        got = l2fast.sq_norm(tensors)
        assert got.shape == () and got.dtype == acc_dtype(tensors)
        assert got.item() == pytest.approx(ref_sq_norm(tensors), rel=1e-5 if got.dtype == torch.float32 else 1e-12)

    def test_on_device(self, device):
        tensors = [torch.randn(300, 7, device=device), torch.randn(5, device=device, dtype=torch.float16)]
        assert l2fast.sq_norm(tensors).item() == pytest.approx(ref_sq_norm(tensors), rel=1e-6)

    def test_empty_list_is_zero(self):
        assert l2fast.sq_norm([]).item() == 0.0
        assert l2fast.sq_norm([torch.empty(0, 5)]).item() == 0.0

    def test_accepts_any_iterable(self):
        model = torch.nn.Linear(3, 2)
        assert l2fast.sq_norm(model.parameters()).item() == pytest.approx(ref_sq_norm(model.parameters()), rel=1e-6)
        t = torch.randn(4)
        assert l2fast.sq_norm(t).item() == pytest.approx(ref_sq_norm([t]), rel=1e-6)

    def test_thousands_of_tiny_tensors(self, device):
        gen = torch.Generator().manual_seed(0)
        tensors = [torch.randn(int(n), generator=gen).to(device) for n in torch.randint(0, 9, (5000,), generator=gen)]
        assert l2fast.sq_norm(tensors).item() == pytest.approx(ref_sq_norm(tensors), rel=1e-6)

    @pytest.mark.slow
    def test_1e8_float32_within_1e_6_of_float64(self, device):
        # torch's own CPU vector_norm drifts at this size (pytorch/pytorch#68326).
        x = torch.rand(100_000_000, generator=torch.Generator().manual_seed(1)).to(device)
        ref = (x.double() ** 2).sum().item()
        assert abs(l2fast.sq_norm([x]).item() - ref) / ref < 1e-6

    def test_deterministic(self, device):
        tensors = [torch.randn(n, device=device) for n in (1_000_003, 17, 65_536, 3)]
        first = l2fast.sq_norm(tensors)
        for _ in range(5):
            assert torch.equal(l2fast.sq_norm(tensors), first)

    def test_result_does_not_depend_on_thread_count(self):
        x = [torch.randn(2_000_000)]
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = l2fast.sq_norm(x)
            torch.set_num_threads(max(2, before))
            assert torch.equal(l2fast.sq_norm(x), one)
        finally:
            torch.set_num_threads(before)

    def test_gradcheck(self, device):
        tensors = [torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True),
                   torch.randn(5, dtype=torch.float64, device=device, requires_grad=True)]
        assert torch.autograd.gradcheck(lambda *t: l2fast.sq_norm(t), tensors)
        assert torch.autograd.gradgradcheck(lambda *t: l2fast.sq_norm(t), tensors)

    def test_opcheck(self, device):
        tensors = [torch.randn(3, 4, device=device), torch.randn(5, device=device, dtype=torch.float64).requires_grad_()]
        torch.library.opcheck(torch.ops.l2fast.sq_norm.default, (tensors,))
        torch.library.opcheck(torch.ops.l2fast.sq_norm.default, ([],))


class TestL2Penalty:
    @hyp
    @given(tensors=tensor_lists(), weight=st.floats(0, 10))
    def test_value_and_gradient_match_float64(self, tensors, weight):
        params = [t.clone().requires_grad_() for t in tensors]
        value = l2fast.l2_penalty(params, weight)
        assert value.item() == pytest.approx(weight * ref_sq_norm(tensors), rel=1e-5, abs=1e-30)
        if weight == 0.0:  # nothing read: a constant 0, outside the graph
            assert not value.requires_grad and value.dtype == acc_dtype(tensors)
            return
        if not params:
            return
        value.backward()
        for p in params:
            expected = (2 * weight * p.detach().double()).to(p.dtype).double()
            # 2·weight is rounded before the product: one unit in the last place, also among subnormals
            tiny = torch.finfo(p.dtype).smallest_normal * torch.finfo(p.dtype).eps
            torch.testing.assert_close(p.grad.double(), expected, rtol=RTOL[p.dtype], atol=tiny)
            assert p.grad.dtype == p.dtype and p.grad.shape == p.shape

    def test_backward_on_device(self, device):
        params = [torch.randn(1000, 3, device=device, requires_grad=True), torch.randn(7, device=device, requires_grad=True)]
        (3 * l2fast.l2_penalty(params, 0.25)).backward()
        for p in params:
            torch.testing.assert_close(p.grad, 1.5 * p.detach())

    def test_gradcheck(self, device):
        params = [torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True).t(),
                  torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)]
        assert torch.autograd.gradcheck(lambda *p: l2fast.l2_penalty(p, 0.7), params)
        assert torch.autograd.gradgradcheck(lambda *p: l2fast.l2_penalty(p, 0.7), params)

    def test_opcheck(self, device):
        params = [torch.randn(6, 2, device=device, requires_grad=True), torch.randn(3, device=device, requires_grad=True)]
        torch.library.opcheck(torch.ops.l2fast.l2_penalty.default, (params, 0.5))

    @pytest.mark.slow
    def test_compile_fullgraph(self):
        model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))

        def loss_fn(model, x, y):
            return torch.nn.functional.cross_entropy(model(x), y) + l2fast.l2_penalty(model.parameters(), 0.01)

        eager = loss_fn(model, x, y)
        eager.backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(loss_fn, fullgraph=True)(model, x, y)
        compiled.backward()
        torch.testing.assert_close(compiled, eager)
        for p, g in zip(model.parameters(), eager_grads):
            torch.testing.assert_close(p.grad, g)


class TestL2PenaltyBackward:
    def test_matches_reference(self, device):
        params = [torch.randn(5, 5, device=device), torch.randn(3, device=device, dtype=torch.float16)]
        grads = torch.ops.l2fast.l2_penalty_backward(torch.tensor(2.0, device=device), params, 0.25)
        for p, g in zip(params, grads):
            torch.testing.assert_close(g, p)

    def test_opcheck(self, device):
        params = [torch.randn(5, 5, device=device), torch.randn(4, 6, device=device).t()]
        torch.library.opcheck(torch.ops.l2fast.l2_penalty_backward.default, (torch.tensor(1.5, device=device), params, 0.3))


class TestL2PenaltyInplace:
    @hyp
    @given(tensors=tensor_lists(), weight=st.floats(0, 10), data=st.data())
    def test_accumulates_into_grads(self, tensors, weight, data):
        params = [t.clone() for t in tensors]
        for i, p in enumerate(params):
            if data.draw(st.booleans(), label=f"grad {i} exists"):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.dtype)
        before = [None if p.grad is None else p.grad.clone() for p in params]
        value = l2fast.l2_penalty_(params, weight)
        assert not value.requires_grad and value.dtype == acc_dtype(tensors)
        assert value.item() == pytest.approx(weight * ref_sq_norm(tensors), rel=1e-5, abs=1e-30)
        for p, g0 in zip(params, before):
            if weight == 0.0:  # nothing read, every grad left as it was
                assert (p.grad is None) if g0 is None else torch.equal(p.grad, g0)
                continue
            expected = 2 * weight * p.double() + (0 if g0 is None else g0.double())
            assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
            torch.testing.assert_close(p.grad.double(), expected.to(p.dtype).double(), rtol=2 * RTOL[p.dtype],
                                       atol=1e-6 if p.dtype == torch.float32 else 1e-2)

    def test_on_device_with_model(self, device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).to(device)
        model(torch.randn(8, 784, device=device)).square().mean().backward()
        data_grads = [p.grad.clone() for p in model.parameters()]
        value = l2fast.l2_penalty_(model.parameters(), 1e-3)
        assert value.item() == pytest.approx(1e-3 * ref_sq_norm(model.parameters()), rel=1e-6)
        for p, g in zip(model.parameters(), data_grads):
            torch.testing.assert_close(p.grad, g + 2e-3 * p.detach())

    def test_non_contiguous_grad(self, device):
        p = torch.randn(6, 4, device=device)
        g = torch.randn(4, 6, device=device).t()  # same shape, other layout
        expected = g + 0.2 * p
        torch.ops.l2fast.l2_penalty_([p], [g], 0.1)
        torch.testing.assert_close(g, expected)

    def test_deterministic(self, device):
        params = [torch.randn(n, device=device) for n in (3_000_001, 5, 70_000)]
        values, grads = [], []
        for _ in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            values.append(l2fast.l2_penalty_(params, 0.3))
            grads.append([p.grad.clone() for p in params])
        assert all(torch.equal(v, values[0]) for v in values)
        assert all(torch.equal(a, b) for gs in grads for a, b in zip(gs, grads[0]))

    def test_opcheck(self, device):
        params = [torch.randn(6, 2, device=device), torch.randn(3, device=device, dtype=torch.bfloat16)]
        grads = [torch.randn_like(p) for p in params]
        torch.library.opcheck(torch.ops.l2fast.l2_penalty_.default, (params, grads, 0.5, [1]))

    @pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # still supported
    def test_torchscript(self, device):
        @torch.jit.script
        def step(params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
            return torch.ops.l2fast.l2_penalty_(params, grads, 0.5, [])

        params = [torch.randn(4, 4, device=device)]
        grads = [torch.zeros(4, 4, device=device)]
        value = step(params, grads)
        assert value.item() == pytest.approx(0.5 * ref_sq_norm(params), rel=1e-6)
        torch.testing.assert_close(grads[0], params[0])

    def test_compile_fullgraph_train_step(self):
        """Forward, backward and the fused penalty in one inductor graph, no graph break."""
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        params = list(model.parameters())
        x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))

        def train_step(x, y):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach() + l2fast.l2_penalty_(params, 0.05)

        def run(step):
            for p in params:
                p.grad = None
            values = [step(x, y) for _ in range(2)]  # the 2nd call adds into existing grads
            return values, [p.grad.clone() for p in params]

        eager_values, eager_grads = run(train_step)
        with torch._dynamo.config.patch(trace_autograd_ops=True):  # lets dynamo trace loss.backward()
            values, grads = run(torch.compile(train_step, fullgraph=True))
        torch.testing.assert_close(values, eager_values)
        torch.testing.assert_close(grads, eager_grads)

    @pytest.mark.slow
    def test_over_2_31_elements(self):
        n = 2**31 + 4099
        p = torch.ones(n, dtype=torch.float16)
        p[-4099:] = 2.0
        p.grad = torch.zeros(n, dtype=torch.float16)
        p.grad[-1] = 1.0
        value = l2fast.l2_penalty_([p], 0.5)
        assert value.item() == torch.tensor(0.5 * (n + 3 * 4099), dtype=torch.float32).item()  # exact, then rounded once
        assert p.grad[0].item() == 1.0 and p.grad[2**31 + 5].item() == 2.0 and p.grad[-1].item() == 3.0


class TestBadInput:
    """Each rejection names the offending index and what was expected, and modifies nothing."""

    def _grads_untouched(self, params, grads, call):
        before = [g.clone() for g in grads]
        call()
        for g, b in zip(grads, before):
            assert torch.equal(g, b)

    def test_non_floating(self):
        # Before issue 18: sq_norm named them params[1], which is not its argument's name.
        with pytest.raises(TypeError, match=r"sq_norm: tensors\[1\] has dtype Long; expected a floating-point tensor"):
            l2fast.sq_norm([torch.randn(3), torch.arange(3)])
        with pytest.raises(TypeError, match=r"l2_penalty: params\[1\] has dtype Long"):
            l2fast.l2_penalty([torch.randn(3), torch.arange(3.0).long()], 0.5)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match=r"params\[1\] is a float; expected a torch.Tensor"):
            l2fast.l2_penalty([torch.randn(2), 1.0], 0.1)

    def test_bad_weight(self):
        with pytest.raises(TypeError, match="weight is a str"):
            l2fast.l2_penalty_([torch.randn(2)], "0.1")

    def test_length_mismatch_modifies_nothing(self):
        params, grads = [torch.randn(3), torch.randn(2)], [torch.zeros(3)]
        with pytest.raises(ValueError, match="got 2 params but 1 grads"):
            self._grads_untouched(params, grads, lambda: torch.ops.l2fast.l2_penalty_(params, grads, 1.0))

    @pytest.mark.parametrize("bad, message", [
        (torch.zeros(4), r"grads\[2\] has shape \[4\] but params\[2\] has shape \[5\]"),
        (torch.zeros(5, dtype=torch.float64), r"grads\[2\] has dtype Double but params\[2\] has dtype Float"),
        (torch.zeros(5, device="meta"), r"grads\[2\] is on meta but params\[2\] is on cpu"),
    ])
    def test_bad_grad_modifies_nothing(self, bad, message):
        params = [torch.randn(3), torch.randn(2), torch.randn(5)]
        grads = [torch.zeros(3), torch.zeros(2), bad]
        with pytest.raises((ValueError, TypeError), match=message):
            self._grads_untouched(params, grads[:2], lambda: torch.ops.l2fast.l2_penalty_(params, grads, 1.0))

    def test_bad_fresh_index(self):
        params, grads = [torch.randn(3)], [torch.zeros(3)]
        with pytest.raises(IndexError, match="fresh index 3 is out of range for 1 params"):
            self._grads_untouched(params, grads, lambda: torch.ops.l2fast.l2_penalty_(params, grads, 1.0, [3]))

    def test_bad_input_via_api_leaves_grads_and_none_grads_alone(self):
        a, b = torch.randn(3), torch.randn(2)
        a.grad = torch.zeros(3)
        with pytest.raises(TypeError, match=r"params\[2\] has dtype Int"):
            l2fast.l2_penalty_([a, b, torch.ones(2, dtype=torch.int32)], 1.0)
        assert torch.equal(a.grad, torch.zeros(3)) and b.grad is None

    def test_grad_sharing_its_params_memory(self):
        p = torch.randn(6)
        with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[0\]"):
            torch.ops.l2fast.l2_penalty_([p], [p.view(2, 3).view(6)], 1.0)

    def test_grad_that_requires_grad(self):
        p, g = torch.randn(3), torch.zeros(3, requires_grad=True)
        with pytest.raises(ValueError, match=r"grads\[0\] requires grad"):
            torch.ops.l2fast.l2_penalty_([p], [g], 1.0)
        assert torch.equal(g.detach(), torch.zeros(3))

    def test_written_grads_bump_their_version(self):
        """Autograd must still catch a backward through a value the op overwrote."""
        p, w = torch.randn(3), torch.randn(3, requires_grad=True)
        g = torch.zeros(3)
        y = (w * g).sum()  # saves g for backward
        torch.ops.l2fast.l2_penalty_([p], [g], 1.0)
        assert g._version > 0
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()

    def test_mixed_devices(self):
        with pytest.raises(ValueError, match=r"tensors\[1\] is on meta but tensors\[0\] is on cpu"):
            torch.ops.l2fast.sq_norm([torch.randn(2), torch.randn(2, device="meta")])
        with pytest.raises(TypeError, match=r"sq_norm: tensors\[0\] is a torch.sparse_coo tensor"):
            torch.ops.l2fast.sq_norm([torch.randn(2).to_sparse()])
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(), pytest.raises(ValueError, match=r"tensors\[1\] is on meta but tensors\[0\]"):
            torch.ops.l2fast.sq_norm([torch.randn(2), torch.randn(2, device="meta")])

    def test_device_without_kernel(self):
        with pytest.raises(ValueError, match=r"params\[0\] is on meta; l2fast has kernels for cpu"):
            l2fast.l2_penalty_([torch.randn(2, device="meta")], 0.1)

    @pytest.mark.cuda
    def test_mixed_cpu_cuda(self):
        with pytest.raises(ValueError, match=r"params\[1\] is on cpu but params\[0\] is on cuda"):
            l2fast.sq_norm([torch.randn(2, device="cuda"), torch.randn(2)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
class TestCudaKernel:
    """What only a GPU can show: one launch per call, no host sync, CUDA-graph capture."""

    @pytest.mark.parametrize("n_tensors", [6, 1000])
    def test_one_kernel_launch_per_call(self, n_tensors):
        params = [torch.randn(257 * (i % 7 + 1), device="cuda") for i in range(n_tensors)]
        for p in params:
            p.grad = torch.zeros_like(p)
        l2fast.l2_penalty_(params, 0.1)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            l2fast.l2_penalty_(params, 0.1)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        assert [e.name for e in kernels if "l2_penalty_kernel" in e.name] and len(kernels) == 1, [e.name for e in kernels]

    def test_no_host_synchronisation(self):
        params = [torch.randn(1000, device="cuda") for _ in range(10)]
        for p in params:
            p.grad = torch.zeros_like(p)
        torch.cuda.set_sync_debug_mode("error")
        try:
            l2fast.l2_penalty_(params, 0.1)
            l2fast.sq_norm(params)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def test_cuda_graph_capture_and_replay(self):
        params = [torch.randn(n, device="cuda") for n in (70_000, 3, 1024)]
        grads = [torch.zeros_like(p) for p in params]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                torch.ops.l2fast.l2_penalty_(params, grads, 0.5)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            value = torch.ops.l2fast.l2_penalty_(params, grads, 0.5)
        values = []
        for scale in (2.0, 3.0):  # new params between replays: a stale completion counter would show
            for g in grads:
                g.zero_()
            for p in params:
                p.mul_(scale)
            graph.replay()
            torch.cuda.synchronize()
            values.append(value.item())
            assert values[-1] == pytest.approx(0.5 * ref_sq_norm(params), rel=1e-6)
            for p, g in zip(params, grads):
                torch.testing.assert_close(g, p)
        assert values[0] != values[1]

    def test_cuda_graph_capture_with_fresh_grads(self):
        params = [torch.randn(n, device="cuda") for n in (5000, 7)]
        static_grads = []

        def step():
            for p in params:
                p.grad = None
            value = l2fast.l2_penalty_(params, 0.25)
            static_grads[:] = [p.grad for p in params]
            return value

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            value = step()
        for p in params:
            p.add_(1.0)
        graph.replay()
        torch.cuda.synchronize()
        assert value.item() == pytest.approx(0.25 * ref_sq_norm(params), rel=1e-6)
        for p, g in zip(params, static_grads):
            torch.testing.assert_close(g, 0.5 * p)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("mode", ["value", "accumulate", "fresh"])
    def test_unaligned_and_strided_match_cpu(self, dtype, mode):
        """Views that defeat 16-byte loads take the element path; it must agree with the CPU."""
        gen = torch.Generator().manual_seed(11)
        n = 70_003  # not a multiple of any vector width, several chunks
        # (storage, view): the views are taken on the device, so their pointers really are unaligned
        base = [(torch.randn(n + 1, generator=gen), lambda t: t[1:]),
                (torch.randn(2 * n, generator=gen), lambda t: t[::2]),
                (torch.randn(n, generator=gen), lambda t: t)]
        grads = [(torch.randn(n, generator=gen), lambda t: t),
                 (torch.randn(n + 1, generator=gen), lambda t: t[1:]),
                 (torch.randn(n + 3, generator=gen), lambda t: t[3:])]  # aligned p with an unaligned g, too
        results = []
        for device in ("cpu", "cuda"):
            ps = [view(t.to(device=device, dtype=dtype)) for t, view in base]
            if mode == "value":
                results.append((l2fast.sq_norm(ps), []))
                continue
            gs = [view(t.to(device=device, dtype=dtype)) for t, view in grads]
            fresh = list(range(len(ps))) if mode == "fresh" else []
            results.append((torch.ops.l2fast.l2_penalty_(ps, gs, 0.3, fresh), gs))
        (v_cpu, g_cpu), (v_gpu, g_gpu) = results
        assert v_gpu.item() == pytest.approx(v_cpu.item(), rel=1e-5)
        for a, b in zip(g_cpu, g_gpu):
            torch.testing.assert_close(b.cpu(), a, rtol=RTOL[dtype], atol=1e-6)

    def test_float32_subnormals_are_not_flushed(self):
        tiny = torch.full((1000,), 1e-39, device="cuda")
        # a float64 in the list makes the sum float64, where 1e-39**2 is representable
        assert l2fast.sq_norm([tiny, torch.zeros(1, dtype=torch.float64, device="cuda")]).item() > 0
        tiny.grad = torch.zeros_like(tiny)
        l2fast.l2_penalty_([tiny], 1.0)
        assert (tiny.grad != 0).all()

    def test_dtypes_match_cpu(self):
        gen = torch.Generator().manual_seed(3)
        cpu = [torch.randn(n, generator=gen).to(dt) for n, dt in zip((100_003, 17, 40_000, 9), DTYPES)]
        gpu = [t.cuda() for t in cpu]
        for ts in (cpu, gpu):
            for t in ts:
                t.grad = torch.ones_like(t)
        v_cpu, v_gpu = l2fast.l2_penalty_(cpu, 0.3), l2fast.l2_penalty_(gpu, 0.3)
        assert v_gpu.item() == pytest.approx(v_cpu.item(), rel=1e-12)
        for a, b in zip(cpu, gpu):
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=RTOL[a.dtype], atol=0)

    @pytest.mark.slow
    def test_over_2_31_elements(self):
        n = 2**31 + 4099
        p = torch.ones(n, dtype=torch.float16, device="cuda")
        p[-4099:] = 2.0
        p.grad = torch.zeros_like(p)
        value = l2fast.l2_penalty_([p], 0.5)
        assert value.item() == torch.tensor(0.5 * (n + 3 * 4099), dtype=torch.float32).item()
        assert p.grad[0].item() == 1.0 and p.grad[-1].item() == 2.0


class TestExtensionLoading:
    """What _C reports about its build (the refusal of a missing or mismatched _C: tests/test_extension.py)."""

    def test_build_info(self):
        info = l2fast.build_info()
        assert info["torch_version"] == torch.__version__
        assert set(info) == {"torch_version", "cuda", "cuda_version", "cuda_arch_list", "cpu_capability"}
