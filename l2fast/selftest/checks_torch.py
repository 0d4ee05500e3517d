"""The ops inside torch's machinery: torch.library.opcheck, gradcheck/gradgradcheck and
torch.compile(fullgraph=True), on every device."""
import logging

import torch

from .checks_ops import has_weights_argument
from .refs import WEIGHT, randn
from .runner import Check, CheckFailed


def _samples(device):
    """Mixed dtypes, views and a zero-size tensor."""
    dev = torch.device(device)
    return [randn((6, 2), torch.float32, dev, 0), randn((3,), torch.bfloat16, dev, 1),
            randn((8, 6), torch.float32, dev, 2).t(), randn((40, 10), torch.float16, dev, 3)[:, ::2],
            randn((0, 4), torch.float32, dev, 4), randn((5,), torch.float64, dev, 5)]


def opcheck_check(device):
    def fn(ctx):
        ops = torch.ops.l2fast
        n = 0
        # the full list (float64 in it: float64 accumulation), and in full runs float32-accumulated ones
        for params in [_samples(device)] + ([] if ctx.quick else [_samples(device)[:4], _samples(device)[2:3]]):
            leaves = [p.detach().requires_grad_() for p in params]
            grads = [torch.randn_like(p) for p in params]
            cases = [(ops.sq_norm.default, (leaves,), {}), (ops.l2_penalty.default, (leaves, 0.5), {}),
                     (ops.l2_penalty_backward.default, (torch.tensor(1.5, device=device), params, 0.3), {}),
                     (ops.l2_penalty_.default, (params, grads, 0.5, [len(params) - 1]), {})]
            if has_weights_argument():
                ws = [0.5 * (i % 3) for i in range(len(params))]
                cases += [(ops.l2_penalty.default, (leaves, 0.5), {"weights": ws}),
                          (ops.l2_penalty_backward.default, (torch.tensor(1.5, device=device), params, 0.3),
                           {"weights": ws}),
                          (ops.l2_penalty_.default, (params, grads, 0.5, [len(params) - 1]), {"weights": ws})]
            for op, args, kwargs in cases:
                report = torch.library.opcheck(op, args, kwargs or None, raise_exception=False)
                bad = {k: v for k, v in report.items() if v != "SUCCESS"}
                if bad:
                    raise CheckFailed(f"{op}: {bad}")
                n += 1
        return f"{n} op/input combinations: {', '.join(report)} all SUCCESS"

    return Check(f"{device} torch.library.opcheck", fn, device)


def gradcheck_check(device):
    def fn(ctx):
        import l2fast

        dev = torch.device(device)
        f64 = torch.float64
        bases = [randn((4, 3), f64, dev, 0), randn((2,), f64, dev, 1), randn((3, 10), f64, dev, 2),
                 randn((0, 3), f64, dev, 3)]
        views = [lambda b: b.t(), lambda b: b, lambda b: b[:, 1::3], lambda b: b]
        leaves = [b.requires_grad_() for b in bases]

        def penalty(*ts):
            return l2fast.l2_penalty([v(t) for v, t in zip(views, ts)], 0.7)

        def sq(*ts):
            return l2fast.sq_norm([v(t) for v, t in zip(views, ts)])

        def backward_op(g, *ts):
            return tuple(torch.ops.l2fast.l2_penalty_backward(g, [v(t) for v, t in zip(views, ts)], 0.7))

        g = torch.tensor(1.3, dtype=f64, device=dev, requires_grad=True)
        for name, f, inputs in (("l2_penalty", penalty, leaves), ("sq_norm", sq, leaves),
                                ("l2_penalty_backward", backward_op, [g, *leaves])):
            if not torch.autograd.gradcheck(f, inputs, raise_exception=False):
                raise CheckFailed(f"gradcheck of {name} failed")
            if not torch.autograd.gradgradcheck(f, inputs, raise_exception=False):
                raise CheckFailed(f"gradgradcheck of {name} failed")
        return "gradcheck and gradgradcheck of l2_penalty, sq_norm, l2_penalty_backward on float64 views"

    return Check(f"{device} gradcheck", fn, device)


def compile_check(device):
    def fn(ctx):
        # inductor warns, mid-table, that a CPU-only machine has no CUDA runtime: true and harmless here
        logger = logging.getLogger("torch.utils.cpp_extension")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            return _compile(device)
        finally:
            logger.setLevel(level)

    return Check(f"{device} torch.compile(fullgraph=True)", fn, device)


def _compile(device):
    import l2fast

    dev = torch.device(device)
    torch.manual_seed(0)
    params = [randn((30, 20), torch.float32, dev, 0), randn((20,), torch.float32, dev, 1),
              randn((40, 7), torch.float16, dev, 2).t()]
    parts = []

    # 1. value ops and the in-place op, no autograd
    def values(params, grads):
        v = l2fast.l2_penalty(params, WEIGHT) + l2fast.sq_norm(params)
        return v + torch.ops.l2fast.l2_penalty_(params, grads, WEIGHT, [])

    grads_e = [torch.zeros_like(p) for p in params]
    grads_c = [torch.zeros_like(p) for p in params]
    eager = values(params, grads_e)
    compiled = torch.compile(values, fullgraph=True)(params, grads_c)
    _same("values", compiled, eager, grads_c, grads_e)
    parts.append("value ops + l2_penalty_")

    # 2. the penalty in the loss, backward through the compiled graph
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).to(dev)
    x, y = torch.randn(16, 8, device=dev), torch.randint(0, 2, (16,), device=dev)

    def loss_fn(x, y):
        return torch.nn.functional.cross_entropy(model(x), y) + l2fast.l2_penalty(model.parameters(), 0.01)

    def run(f):
        model.zero_grad(set_to_none=True)
        loss = f(x, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (le, ge), (lc, gc) = run(loss_fn), run(torch.compile(loss_fn, fullgraph=True))
    _same("loss + l2_penalty", lc, le, gc, ge)
    parts.append("l2_penalty in a loss with backward")

    # 3. a whole train step: forward, loss.backward() and l2_penalty_ in one graph
    params3 = list(model.parameters())

    def train_step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach() + l2fast.l2_penalty_(params3, 0.05)

    def run3(step):
        model.zero_grad(set_to_none=True)
        values = [step(x, y) for _ in range(2)]  # the 2nd call adds into existing grads
        return torch.stack(values), [p.grad.clone() for p in params3]

    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        (ve, ge) = run3(train_step)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            (vc, gc) = run3(torch.compile(train_step, fullgraph=True))
        _same("train step", vc, ve, gc, ge)
        parts.append("a train step with loss.backward() (trace_autograd_ops)")
    else:
        parts.append("(train step with backward not tried: this torch has no trace_autograd_ops)")
    torch.compiler.reset()
    return "fullgraph=True, inductor, same as eager: " + "; ".join(parts)


def _same(what, value, value_ref, grads, grads_ref):
    try:
        torch.testing.assert_close(value, value_ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    except AssertionError as e:
        raise CheckFailed(f"{what}: compiled differs from eager: {' '.join(str(e).split())[:300]}") from None


def checks(device):
    return [opcheck_check(device), gradcheck_check(device), compile_check(device)]

