"""Float64 references, the tolerances the ops are held to, and the test inputs the checks share."""
import torch

from .runner import CheckFailed

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
WEIGHT = 0.37  # not a power of two: a scale rounded on the way shows up

# Relative error of a value against float64, by accumulation dtype: float32 partials per chunk
# (errors grow like sqrt(n) * eps on random data), float64 when any input is float64.
VALUE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def acc_dtype(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def randn(shape, dtype, device, seed):
    """Seeded normal values, drawn on the CPU (the same on every device) then moved."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def boundary_sizes(quick):
    """Sizes k*2^e - 1, k*2^e, k*2^e + 1 around several powers of two.

    The CPU penalty kernel cuts the list into chunks of 2^14 elements (the AdamW one 2^13); the CUDA
    kernels' chunks are sized in bytes (so their element counts differ by dtype), and smaller for
    small totals; so the boundaries are tested around every power of two in a wide range rather
    than one constant.
    """
    powers = (12, 13, 14, 15) if quick else range(6, 18)
    mults = (1, 3) if quick else (1, 2, 3)
    sizes = {1, 2, 3}
    for e in powers:
        for k in mults:
            sizes.update(k * 2**e + d for d in (-1, 0, 1))
    return sorted(sizes)


class Reference:
    """The float64 answers. A check takes one, so that a deliberately wrong reference can be
    passed to prove the comparison fails (tests/test_selftest.py does)."""

    def sq_norm(self, tensors, weights=None):
        """sum_i w_i * ||t_i||^2 in float64 (tensors whose weight is 0 are not read)."""
        total = 0.0
        for i, t in enumerate(tensors):
            w = 1.0 if weights is None else float(weights[i])
            if w != 0.0 and t.numel():
                total += w * torch.sum(t.detach().double() ** 2).item()
        return total

    def grad(self, g_old, p, scale):
        """g_old + scale * p in float64 (g_old None: a fresh grad)."""
        exact = scale * p.detach().double()
        return exact if g_old is None else exact + g_old.double()


def check_value(what, got, ref, tensors, device):
    """A 0-dim value of the accumulation dtype on `device`, within VALUE_RTOL of the reference.
    Returns the error as a fraction of the tolerance."""
    acc = acc_dtype(tensors)
    if not isinstance(got, torch.Tensor) or got.shape != () or got.dtype != acc or got.device.type != device.type:
        desc = f"{got.dtype} {list(got.shape)} on {got.device}" if isinstance(got, torch.Tensor) else repr(got)
        raise CheckFailed(f"{what}: returned {desc}; expected a 0-dim {dtype_name(acc)} tensor on {device.type}")
    value = got.item()
    if ref == 0.0:
        if value != 0.0:
            raise CheckFailed(f"{what}: value {value!r}; expected exactly 0 (nothing to sum)")
        return 0.0
    rtol = VALUE_RTOL[acc]
    err = abs(value - ref) / abs(ref)
    if not err <= rtol:  # `not <=` also catches NaN
        raise CheckFailed(f"{what}: value {value!r} but the float64 reference is {ref!r} "
                          f"(relative error {err:.2e} > {rtol:.0e})")
    return err / rtol


def within(worst):
    """A passing check's errors, said as a pass: the worst as a fraction of its tolerance (≤ 1 passes;
    report.py's READING explains it)."""
    return f"all within tolerance (worst error {worst:.2f}×)"


def grad_tolerance(dtype, bound, slack=1.0):
    """Half an ulp of the stored dtype, plus a few of the float32/float64 arithmetic before the
    rounding, relative to `bound` = |g_old| + |scale * p| (no cancellation can hide an error),
    plus the spacing of subnormals."""
    fin = torch.finfo(dtype)
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return slack * ((fin.eps / 2 + 4 * acc_eps) * bound + fin.tiny * fin.eps)


def check_grad(what, got, expected, bound, dtype, shape, slack=1.0):
    """`got` (dtype, shape) against float64 `expected`, within grad_tolerance of `bound`.
    Returns the worst error as a fraction of the tolerance."""
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{what}: is {type(got).__name__}; expected a tensor")
    if got.dtype != dtype or tuple(got.shape) != tuple(shape):
        raise CheckFailed(f"{what}: is {dtype_name(got.dtype)} {list(got.shape)}; expected "
                          f"{dtype_name(dtype)} {list(shape)}")
    if got.numel() == 0:
        return 0.0
    err = (got.detach().double() - expected).abs()
    tol = grad_tolerance(dtype, bound, slack)
    bad = ~(err <= tol)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        g, e, t = got.detach().double().flatten()[i].item(), expected.flatten()[i].item(), tol.flatten()[i].item()
        raise CheckFailed(f"{what}: element {i} (of {got.numel():,}) is {g!r}; expected {e!r} "
                          f"within {t:.3g} ({int(bad.sum()):,} elements off)")
    return (err / tol).max().item()


def check_grad_update(what, got, g_old, p, scale, ref):
    """The grad an op wrote: g_old + scale * p (g_old None: a fresh grad)."""
    expected = ref.grad(g_old, p, scale)
    bound = (scale * p.detach().double()).abs()
    if g_old is not None:
        bound = bound + g_old.double().abs()
    return check_grad(what, got, expected, bound, p.dtype, p.shape)


def exact_constant_sq_norm(value, n, dtype):
    """n * v^2 for v = `value` rounded to dtype, in float64 (v^2 is exact there: at most 48 bits)."""
    v = torch.tensor(value, dtype=dtype).double().item()
    return n * v * v


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def check_unchanged(what, tensors, before):
    """Bit-identical to the snapshot (NaN included)."""
    for i, (t, b) in enumerate(zip(tensors, before)):
        if t.shape != b.shape or not torch.equal(_bits(t), _bits(b)):
            raise CheckFailed(f"{what}: tensor {i} was modified; expected it untouched")


_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    t = t.detach().contiguous()
    return t.view(_INT_OF[t.element_size()]) if t.is_floating_point() else t


def bit_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def all_bit_equal(a, b):
    """Two lists of tensors, pairwise bit-identical."""
    return all(bit_equal(x, y) for x, y in zip(a, b))


def identical_runs(once, device, repeats):
    """once() `repeats` times, and on the CPU once more with each of 1, 2 and torch's thread counts;
    CheckFailed unless every run's outputs are bit-identical to the first run's. Returns (runs, a note
    naming the thread counts, or "")."""
    runs = [once() for _ in range(repeats)]
    threads = ""
    if device.type == "cpu":
        saved = torch.get_num_threads()
        try:
            for t in sorted({1, 2, saved}):
                torch.set_num_threads(t)
                runs.append(once())
        finally:
            torch.set_num_threads(saved)
        threads = f", and with {sorted({1, 2, saved})} threads"
    for r, run in enumerate(runs[1:], 1):
        for k, (a, b) in enumerate(zip(runs[0], run)):
            if not bit_equal(a, b):
                raise CheckFailed(f"run {r} output {k} differs from run 0 (expected bit-identical)")
    return runs, threads
