"""Issue 10 (aliasing, non-dense params, version counters) and issue 9 item 10 (bad weights and
layouts): each rejection names what was wrong and modifies nothing; what is legal computes right."""
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import l2fast
import l2fast.ops  # noqa: F401  (registers torch.ops.l2fast.*)

OPS = torch.ops.l2fast
hyp = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ref_value(tensors, weight):
    return weight * sum(((t.detach().double() ** 2).sum().item() for t in tensors), 0.0)


def untouched(grads, call):
    before = [g.clone() for g in grads]
    call()
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


class TestAliasing:
    def test_one_grad_shared_by_two_params(self, device):
        params = [torch.randn(300, device=device), torch.randn(300, device=device)]
        g = torch.zeros(300, device=device)
        with pytest.raises(ValueError, match=r"grads\[1\] shares memory with grads\[0\]"):
            untouched([g], lambda: OPS.l2_penalty_(params, [g, g], 1.0))

    def test_same_param_listed_twice_through_the_api(self):
        p = torch.randn(50)
        p.grad = torch.zeros(50)
        with pytest.raises(ValueError, match=r"grads\[1\] shares memory with grads\[0\]"):
            untouched([p.grad], lambda: l2fast.l2_penalty_([p, p], 1.0))

    def test_grads_partially_overlapping(self, device):
        buf = torch.zeros(100, device=device)
        params = [torch.randn(10, device=device), torch.randn(60, device=device), torch.randn(60, device=device)]
        grads = [torch.zeros(10, device=device), buf[:60], buf[40:]]
        with pytest.raises(ValueError, match=r"grads\[2\] shares memory with grads\[1\]"):
            untouched([buf], lambda: OPS.l2_penalty_(params, grads, 1.0))

    def test_grad_overlapping_another_param(self, device):
        params = [torch.randn(8, 8, device=device), torch.randn(8, device=device)]
        grads = [torch.zeros(8, 8, device=device), params[0][3]]  # grads[1] is a row of params[0]
        with pytest.raises(ValueError, match=r"grads\[1\] shares memory with params\[0\]"):
            untouched([*grads, params[0]], lambda: OPS.l2_penalty_(params, grads, 1.0))

    def test_grad_overlapping_its_param_through_a_strided_view(self, device):
        base = torch.randn(6, 8, device=device)
        p, g = base[:, :6:2], base[:, 2::2]  # columns 0,2,4 and 2,4,6: neither is dense
        with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[0\]"):
            untouched([base], lambda: OPS.l2_penalty_([p], [g], 1.0))

    def test_expanded_grad(self, device):
        params = [torch.randn(3, device=device), torch.randn(4, 5, device=device)]
        grads = [torch.zeros(3, device=device), torch.zeros(1, 5, device=device).expand(4, 5)]
        with pytest.raises(ValueError, match=r"grads\[1\] has elements that share memory"):
            untouched(grads, lambda: OPS.l2_penalty_(params, grads, 1.0))

    def test_interleaved_grads_of_one_buffer_are_legal(self, device):
        """Byte ranges that intersect without sharing an element: exact, not a false alarm."""
        buf = torch.zeros(2, 500, device=device)
        params = [torch.randn(500, device=device), torch.randn(500, device=device)]
        grads = [buf.view(-1)[0::2], buf.view(-1)[1::2]]
        OPS.l2_penalty_(params, grads, 0.5)
        for p, g in zip(params, grads):
            torch.testing.assert_close(g, p)

    def test_param_and_grad_interleaved_in_one_buffer(self, device):
        buf = torch.randn(1000, device=device)
        p, g = buf[0::2], buf[1::2]
        expected = g + 0.4 * p
        OPS.l2_penalty_([p], [g], 0.2)
        torch.testing.assert_close(g, expected)

    def test_overlapping_params_are_legal(self, device):
        w = torch.randn(30, 20, device=device)
        params = [w, w, w[:10], w.t()]  # only read
        grads = [torch.zeros_like(p) for p in params]
        value = OPS.l2_penalty_(params, grads, 0.5)
        assert value.item() == pytest.approx(ref_value(params, 0.5), rel=1e-6)
        for p, g in zip(params, grads):
            torch.testing.assert_close(g, p)

    def test_grads_as_views_of_one_flat_buffer(self, device):
        """apex/FSDP1-style flat grad buffer: adjacent, disjoint views."""
        shapes = [(7, 3), (5,), (2, 2, 2), (1,)]
        flat = torch.zeros(sum(torch.Size(s).numel() for s in shapes), device=device)
        grads = [t.view(s) for t, s in zip(flat.split([torch.Size(s).numel() for s in shapes]), shapes)]
        params = [torch.randn(s, device=device) for s in shapes]
        OPS.l2_penalty_(params, grads, 0.5)
        for p, g in zip(params, grads):
            torch.testing.assert_close(g, p)


class TestSharedMemoryExactly:
    """Issue 18 items 1-2: memory is compared by address and byte, exactly, at any size: what cannot be
    proven disjoint is refused naming both tensors; what is disjoint is accepted and computed right."""

    def test_grad_overlapping_itself_through_as_strided(self):
        # Before: accepted ("too hard to tell" was taken as "no overlap"), and grads were written twice.
        q = torch.randn(3, 3)
        b = torch.zeros(5)
        q.grad = b.as_strided((3, 3), (1, 1))
        for call in (lambda: OPS.l2_penalty_([q], [q.grad], 0.5), lambda: l2fast.l2_penalty_([q], 0.5),
                     lambda: l2fast.L2Penalty([q], 0.5).add_grad_()):
            with pytest.raises(ValueError, match=r"grads\[0\] has elements that share memory"):
                untouched([b], call)

    def test_folded_strides_that_do_not_overlap_are_legal(self):
        """Strides (2, 3) over sizes (3, 2) reach offsets 0, 3, 2, 5, 4, 7: no two alike."""
        buf = torch.zeros(8)
        p = torch.randn(3, 2)
        g = buf.as_strided((3, 2), (2, 3))
        OPS.l2_penalty_([p], [g], 0.5)
        torch.testing.assert_close(g, p)
        assert buf[[1, 6]].eq(0).all()

    @pytest.mark.parametrize("api", ["op", "l2_penalty_", "L2Penalty"])
    def test_two_storages_on_one_memory(self, api):
        # Before: accepted (aliasing was keyed by storage object), and the memory was written twice.
        np = pytest.importorskip("numpy")
        a = np.zeros(15, np.float32)
        q0, q1 = torch.randn(15), torch.randn(15)
        q0.grad, q1.grad = torch.from_numpy(a), torch.from_numpy(a)
        assert q0.grad.untyped_storage()._cdata != q1.grad.untyped_storage()._cdata
        call = {"op": lambda: OPS.l2_penalty_([q0, q1], [q0.grad, q1.grad], 0.5),
                "l2_penalty_": lambda: l2fast.l2_penalty_([q0, q1], 0.5),
                "L2Penalty": lambda: l2fast.L2Penalty([q0, q1], 0.5).add_grad_()}[api]
        with pytest.raises(ValueError, match=r"grads\[1\] shares memory with grads\[0\]"):
            call()
        assert not a.any()

    def test_grad_and_param_on_one_numpy_buffer(self):
        np = pytest.importorskip("numpy")
        a = np.arange(12, dtype=np.float32)
        p = torch.from_numpy(a)[:6]
        p.grad = torch.from_numpy(a)[4:10]  # another storage object, two elements in common
        with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[0\]"):
            l2fast.l2_penalty_([p], 0.5)
        assert np.array_equal(a, np.arange(12, dtype=np.float32))

    def test_interleaved_grads_beyond_2_24_elements(self):
        # Before: refused as shared (the element-wise comparison gave up past 2^24 elements).
        n = 2**23 + 1
        buf = torch.zeros(2 * n)
        params = [torch.rand(n), torch.rand(n)]
        grads = [buf[0::2], buf[1::2]]
        value = OPS.l2_penalty_(params, grads, 0.5)
        assert value.item() == pytest.approx(ref_value(params, 0.5), rel=1e-6)
        for p, g in zip(params, grads):
            assert torch.equal(g, p)  # 2 * 0.5 * p, exactly

    @pytest.mark.parametrize("n", [2, 7, 300])
    def test_many_grads_interleaved_in_one_buffer(self, n):
        buf = torch.zeros(n * 5)
        params = [torch.randn(5, dtype=torch.float64).float() for _ in range(n)]
        grads = [buf[i::n] for i in range(n)]
        for call in range(2):  # the second call through L2Penalty's cached validation
            before = [g.clone() for g in grads]
            if call == 0:
                value = OPS.l2_penalty_(params, grads, 0.25)
            else:
                for p, g in zip(params, grads):
                    p.grad = g
                pen = l2fast.L2Penalty(params, 0.25)
                value = pen.add_grad_()
                before = [g.clone() for g in grads]
                value = pen.add_grad_()
            assert value.item() == pytest.approx(ref_value(params, 0.25), rel=1e-6)
            for p, g, b in zip(params, grads, before):
                torch.testing.assert_close(g, b + 0.5 * p)

    def test_one_interleaved_grad_listed_twice(self):
        n = 50
        buf = torch.zeros(n * 4)
        params = [torch.randn(4) for _ in range(n)]
        grads = [buf[i::n] for i in range(n)]
        grads[40] = buf[3::n]
        with pytest.raises(ValueError, match=r"grads\[40\] shares memory with grads\[3\]"):
            untouched([buf], lambda: OPS.l2_penalty_(params, grads, 0.5))

    def test_strided_param_meeting_an_interleaved_grad(self):
        buf = torch.randn(30)
        params = [buf[0::3], buf[0::2][:10]]  # the second reads offsets 0, 2, 4, ...: 4 is grads[0]'s
        grads = [buf[1::3], torch.zeros(10)]
        with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[1\]"):
            untouched([buf], lambda: OPS.l2_penalty_(params, grads, 0.5))
        params[1] = buf[0::6][:5].repeat(2)  # a copy: apart
        OPS.l2_penalty_(params, grads, 0.5)

    def test_mixed_element_sizes_in_one_buffer(self):
        """A float64 view and float32 views of one buffer: compared byte by byte."""
        buf = torch.zeros(16)
        wide = buf.view(torch.float64)  # 8 values, each over two float32 slots
        params = [torch.randn(4, dtype=torch.float64), torch.randn(4)]
        grads = [wide[0::2], buf[2::4]]  # float32 slots 0-1, 4-5, ... and 2, 6, 10, 14: apart
        OPS.l2_penalty_(params, grads, 0.5)
        torch.testing.assert_close(grads[0], params[0])
        grads[1] = buf[1::4]  # slot 1 is inside wide[0]
        with pytest.raises(ValueError, match=r"grads\[1\] shares memory with grads\[0\]"):
            OPS.l2_penalty_(params, grads, 0.5)

    def test_sparse_span_is_decided_too(self):
        """Views far apart in one buffer (a bitmap over the span would dwarf the elements)."""
        buf = torch.zeros(100_000)
        params = [torch.randn(3), torch.randn(3)]
        grads = [buf[0::40_000], buf[1::40_000]]
        OPS.l2_penalty_(params, grads, 0.5)
        torch.testing.assert_close(grads[1], params[1])
        grads[1] = buf.as_strided((3,), (39_999,), 1)  # offsets 1, 40000, 79999: 40000 is grads[0]'s
        with pytest.raises(ValueError, match=r"grads\[1\] shares memory with grads\[0\]"):
            OPS.l2_penalty_(params, grads, 0.5)

    @hyp
    @given(st.data())
    def test_any_views_of_one_buffer_match_a_byte_level_reference(self, data):
        """Random as_strided pairs (and float64 views) of one buffer: refused exactly when a written
        byte is shared, naming a pair that shares one; else the float64 reference holds."""
        buf = torch.zeros(48, dtype=torch.float32)
        k = data.draw(st.integers(1, 4), label="pairs")
        params, grads, views = [], [], []
        for i in range(k):
            dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label=f"dtype {i}")
            base = buf if dtype == torch.float32 else buf.view(torch.float64)
            shape = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=2), label=f"shape {i}")
            pair = []
            for role in ("param", "grad"):
                if role == "param" and data.draw(st.booleans(), label=f"param {i} own memory"):
                    pair.append(torch.randn(shape, dtype=dtype))
                    continue
                strides = [data.draw(st.integers(0 if role == "param" else 1, 5), label=f"{role} {i} stride")
                           for _ in shape]
                reach = sum((n - 1) * st_ for n, st_ in zip(shape, strides))
                offset = data.draw(st.integers(0, base.numel() - 1 - reach), label=f"{role} {i} offset")
                pair.append(base.as_strided(shape, strides, offset))
            params.append(pair[0])
            grads.append(pair[1])
        with torch.no_grad():
            buf.copy_(torch.randn(48))

        def byte_sets(t):
            if t.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr():
                return []
            item = t.element_size()
            starts = torch.as_strided(torch.arange(buf.numel() * 4 // item), t.shape, t.stride(),
                                      t.storage_offset()).reshape(-1).tolist()
            return [set(range(s * item, (s + 1) * item)) for s in starts]

        elems = {("params", i): byte_sets(p) for i, p in enumerate(params)}
        elems.update({("grads", i): byte_sets(g) for i, g in enumerate(grads)})

        def share(a, b):
            if a == b:
                sets = elems[a]
                return any(x & y for j, x in enumerate(sets) for y in sets[j + 1:])
            return any(x & y for x in elems[a] for y in elems[b])

        conflicts = {(a, b) for a in elems if a[0] == "grads" for b in elems if share(a, b)}
        expected_p = [p.double().clone() for p in params]
        expected_g = [g.double().clone() + 2 * 0.5 * p.double() for p, g in zip(params, grads)]
        before = buf.clone()
        if conflicts:
            with pytest.raises(ValueError) as err:
                OPS.l2_penalty_(params, grads, 0.5)
            assert torch.equal(buf, before)
            msg = str(err.value)
            m = re.search(r"(params|grads)\[(\d+)\] (shares memory with|has elements) (?:(params|grads)\[(\d+)\])?", msg)
            assert m, msg
            a = (m.group(1), int(m.group(2)))
            b = a if m.group(3) == "has elements" else (m.group(4), int(m.group(5)))
            assert a[0] == "grads" and share(a, b), msg
        else:
            OPS.l2_penalty_(params, grads, 0.5)
            for p, g, wp, wg in zip(params, grads, expected_p, expected_g):
                torch.testing.assert_close(p.double(), wp)
                torch.testing.assert_close(g.double(), wg, rtol=1e-6, atol=1e-6)

    def test_reusable_for_several_written_lists(self):
        """The check takes any lists marked written or read-only (an optimizer's params, grads, moments)."""
        check = l2fast._C._check_no_shared_memory
        params = [torch.randn(4), torch.randn(3)]
        grads = [torch.randn(4), params[1]]  # read-only, but on a written param
        moments = [torch.zeros(4), torch.zeros(3)]
        with pytest.raises(ValueError, match=r"params\[1\] shares memory with grads\[1\]"):
            check("opt", [("params", params, True), ("grads", grads, False), ("exp_avg", moments, True)])
        grads[1] = torch.randn(3)
        check("opt", [("params", params, True), ("grads", grads + grads, False), ("exp_avg", moments, True)])
        moments[1] = params[0][:3]
        with pytest.raises(ValueError, match=r"exp_avg\[1\] shares memory with params\[0\]"):
            check("opt", [("params", params, True), ("grads", grads, False), ("exp_avg", moments, True)])


class TestNonDenseParams:
    """Params that are real views (a sliced nn.Linear weight, an expand), not clones."""

    def views(self, device):
        torch.manual_seed(0)
        lin = torch.nn.Linear(80, 40).to(device)
        return [lin.weight.detach()[:, ::2], lin.bias.detach()[None].expand(3, 40), lin.weight.detach().t()[5:9]]

    def test_inplace_with_fresh_and_existing_grads(self, device):
        params = self.views(device)
        params[0].grad = torch.ones(params[0].shape, device=device)
        value = l2fast.l2_penalty_(params, 0.25)
        assert value.item() == pytest.approx(ref_value(params, 0.25), rel=1e-6)
        torch.testing.assert_close(params[0].grad, 1 + 0.5 * params[0])
        for p in params[1:]:
            torch.testing.assert_close(p.grad, 0.5 * p)

    def test_differentiable(self, device):
        torch.manual_seed(0)
        lin = torch.nn.Linear(80, 40).to(device)
        value = l2fast.l2_penalty([lin.weight[:, ::2], lin.bias[None].expand(3, 40)], 0.5)
        value.backward()
        expected_w = torch.zeros_like(lin.weight)
        expected_w[:, ::2] = lin.weight.detach()[:, ::2]
        torch.testing.assert_close(lin.weight.grad, expected_w)
        torch.testing.assert_close(lin.bias.grad, 3 * lin.bias.detach())


class TestVersionCounters:
    def test_bumped_under_inference_mode(self):
        """A backward through a grad the op overwrote under inference_mode raises, as torch's ops do."""
        p, w = torch.randn(3), torch.randn(3, requires_grad=True)
        g = torch.zeros(3)
        y = (w * g).sum()  # saves g for backward
        version = g._version
        with torch.inference_mode():
            OPS.l2_penalty_([p], [g], 1.0)
        assert g._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()

    def test_bumped_once_with_grad_mode(self):
        p, g = torch.randn(3), torch.zeros(3)
        version = g._version
        OPS.l2_penalty_([p], [g], 1.0)
        assert g._version == version + 1

    def test_inference_tensor_outside_inference_mode(self):
        with torch.inference_mode():
            g = torch.zeros(3)
        p, other = torch.randn(3), torch.zeros(3)
        with pytest.raises(RuntimeError, match=r"grads\[1\] is an inference tensor"):
            untouched([other, g], lambda: OPS.l2_penalty_([p, p], [other, g], 1.0))


class TestLayouts:
    @pytest.mark.parametrize("make, message", [
        (lambda: torch.randn(3).to_sparse(), r"{}\[1\] is a torch.sparse_coo tensor; .*dense"),
        (lambda: torch.randn(3, 3).to_sparse_csr(), r"{}\[1\] is a torch.sparse_csr tensor"),
        (lambda: torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8),
         r"{}\[1\] is a quantized tensor \(dtype QInt8\)"),
    ])
    def test_named_not_called_a_device(self, make, message):
        params = [torch.randn(3), make()]
        grads = [torch.zeros(3), torch.zeros(3) if params[1].dim() == 1 else torch.zeros(3, 3)]
        for call, name in ((lambda: OPS.sq_norm(params), "tensors"), (lambda: OPS.l2_penalty(params, 0.1), "params"),
                           (lambda: untouched([grads[0]], lambda: OPS.l2_penalty_(params, grads, 0.1)), "params")):
            with pytest.raises(TypeError, match=message.format(name)):  # sq_norm's argument is `tensors`
                call()

    def test_sparse_grad(self):
        params, grads = [torch.randn(3), torch.randn(3)], [torch.zeros(3), torch.zeros(3).to_sparse()]
        with pytest.raises(TypeError, match=r"grads\[1\] is a torch.sparse_coo tensor"):
            untouched([grads[0]], lambda: OPS.l2_penalty_(params, grads, 0.1))

    @pytest.mark.parametrize("weight", [float("nan"), float("inf")])
    def test_non_finite_weight(self, weight):
        p = torch.randn(3)
        p.grad = torch.zeros(3)
        with pytest.raises(ValueError, match=f"l2fast.l2_penalty_: weight is {weight}; expected a finite number"):
            OPS.l2_penalty_([p], [p.grad], weight)
        with pytest.raises(ValueError, match=f"weight is {weight}"):  # the API's own wording
            l2fast.l2_penalty_([p], weight)
        assert torch.equal(p.grad, torch.zeros(3))
        with pytest.raises(ValueError, match=f"l2fast.l2_penalty: weight is {weight}"):
            OPS.l2_penalty([p], weight)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
class TestCudaTables:
    """The per-call table: a kernel parameter up to 672 tensors, a device table tied to the
    stream or the graph beyond; chunks sized in bytes."""

    @pytest.mark.parametrize("n_tensors", [5, 32, 33, 672, 673, 2000])
    def test_table_sizes_match_float64(self, n_tensors):
        gen = torch.Generator().manual_seed(n_tensors)
        cpu = [torch.randn(int(k), generator=gen) for k in torch.randint(1, 3000, (n_tensors,), generator=gen)]
        params = [t.cuda() for t in cpu]
        grads = [torch.ones_like(p) for p in params]
        ws = [float(i % 3) for i in range(n_tensors)]  # every third tensor unread
        value = OPS.l2_penalty_(params, grads, 0.5, [1], ws)
        ref = 0.5 * sum(w * (t.double() ** 2).sum().item() for t, w in zip(cpu, ws))
        assert value.item() == pytest.approx(ref, rel=1e-6)
        for i, (t, g, w) in enumerate(zip(cpu, grads, ws)):
            expected = (0 if i == 1 else 1) + w * t if w else (torch.zeros_like(t) if i == 1 else torch.ones_like(t))
            torch.testing.assert_close(g.cpu(), expected)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
    def test_chunk_boundaries(self, dtype):
        """k * chunk +- 1 elements for every chunk size a call may pick (4 KB to 64 KB)."""
        itemsize = torch.tensor([], dtype=dtype).element_size()
        sizes = [k * (kb << 10) // itemsize + d for kb in (4, 8, 16, 32, 64) for k in (1, 3) for d in (-1, 0, 1)]
        for filler in (0, 40 << 20):  # small totals pick small chunks, big ones 64 KB
            cpu = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) for n in sizes]
            cpu.append(torch.rand(filler // itemsize).to(dtype))
            params = [t.cuda() for t in cpu]
            grads = [torch.zeros_like(p) for p in params]
            value = OPS.l2_penalty_(params, grads, 0.25)
            ref = 0.25 * sum((t.double() ** 2).sum().item() for t in cpu)
            assert value.item() == pytest.approx(ref, rel=1e-5)
            for t, g in zip(cpu, grads):
                torch.testing.assert_close(g.cpu(), (0.5 * t.double()).to(dtype))

    def test_long_list_captured_and_replayed(self):
        params = [torch.randn(100 + i, device="cuda") for i in range(1000)]  # beyond the parameter table
        grads = [torch.zeros_like(p) for p in params]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="global"):
            value = OPS.l2_penalty_(params, grads, 0.5)
        for scale in (2.0, 3.0):
            for p, g in zip(params, grads):
                p.mul_(scale)
                g.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert value.item() == pytest.approx(0.5 * ref_value(params, 1.0), rel=1e-6)
            for p, g in zip(params, grads):
                torch.testing.assert_close(g, p)

    def test_200_captures_keep_memory_flat(self):
        """The pinned table of a long list lives as long as its graph, not the process."""
        params = [torch.randn(64, device="cuda") for _ in range(1000)]
        grads = [torch.zeros_like(p) for p in params]

        def capture_and_drop():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                OPS.l2_penalty_(params, grads, 0.5)
            graph.replay()
            torch.cuda.synchronize()
            del graph

        for _ in range(20):
            capture_and_drop()
        OPS.l2_penalty_(params, grads, 0.5)  # releases the tables of destroyed graphs
        torch.cuda.synchronize()
        device0, host0 = torch.cuda.memory_allocated(), torch.cuda.host_memory_stats()["active_bytes.current"]
        for _ in range(200):
            capture_and_drop()
        OPS.l2_penalty_(params, grads, 0.5)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= device0
        assert torch.cuda.host_memory_stats()["active_bytes.current"] <= host0 + 64 * 1024

    def test_one_launch_with_weights_and_fresh_zero_fill(self):
        params = [torch.randn(257 * (i % 7 + 1), device="cuda") for i in range(1000)]
        grads = [torch.full_like(p, float("nan")) for p in params]
        ws = [0.0 if i % 2 else 1.0 for i in range(1000)]
        fresh = list(range(1000))
        OPS.l2_penalty_(params, grads, 0.1, fresh, ws)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            OPS.l2_penalty_(params, grads, 0.1, fresh, ws)
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        assert len(kernels) == 1 and "l2_penalty_kernel" in kernels[0], kernels
        for p, g, w in zip(params, grads, ws):
            torch.testing.assert_close(g, 0.2 * p if w else torch.zeros_like(p))
