"""torch.ops.l2fast.*: loads the compiled kernels, and registers their fake kernels and double backward.

The public API over these ops is l2fast.functional.
"""
import math

import torch

from . import _extension

_BUILD_INFO = _extension.load()
_KERNEL_DEVICES = ("cpu", "cuda") if _BUILD_INFO["cuda"] else ("cpu",)


def build_info():
    """What l2fast._C was built with: torch version, CUDA (bool, version, archs), CPU capability."""
    return dict(_BUILD_INFO)


def _acc_dtype(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_weights(op, weight, weights, n):
    # The same checks as the kernels' (csrc/l2_penalty.cpp), so that traced code fails as eager does.
    if not math.isfinite(weight):
        raise ValueError(f"{op}: weight is {weight}; expected a finite number")
    if weights is None:
        return
    if len(weights) != n:
        raise ValueError(f"{op}: got {len(weights)} weights for {n} params; expected one weight per param")
    for i, w in enumerate(weights):
        if not math.isfinite(w):
            raise ValueError(f"{op}: weights[{i}] is {w}; expected a finite number")


def _fake_value(op, tensors, name="params"):
    for i, t in enumerate(tensors):
        if t.device != tensors[0].device:
            raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {name}[0] is on {tensors[0].device}; "
                             "all tensors must be on one device")
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty((), dtype=_acc_dtype(tensors), device=device)


@torch.library.register_fake("l2fast::sq_norm")
def _sq_norm_fake(tensors):
    return _fake_value("l2fast.sq_norm", tensors, "tensors")


@torch.library.register_fake("l2fast::l2_penalty")
def _l2_penalty_fake(params, weight, weights=None):
    _check_weights("l2fast.l2_penalty", weight, weights, len(params))
    return _fake_value("l2fast.l2_penalty", params)


@torch.library.register_fake("l2fast::l2_penalty_backward")
def _l2_penalty_backward_fake(grad, params, weight, weights=None):
    _check_weights("l2fast.l2_penalty_backward", weight, weights, len(params))
    return [torch.empty_like(p) for p in params]


@torch.library.register_fake("l2fast::l2_penalty_")
def _l2_penalty_inplace_fake(params, grads, weight, fresh=(), weights=None):
    op = "l2fast.l2_penalty_"
    _check_weights(op, weight, weights, len(params))
    if len(grads) != len(params):
        raise ValueError(f"{op}: got {len(params)} params but {len(grads)} grads; expected one grad per param")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.device != p.device:
            raise ValueError(f"{op}: grads[{i}] is on {g.device} but params[{i}] is on {p.device}; "
                             "a grad must be on its param's device")
        if g.dtype != p.dtype or g.shape != p.shape:
            raise ValueError(f"{op}: grads[{i}] is {g.dtype} {list(g.shape)} but params[{i}] is "
                             f"{p.dtype} {list(p.shape)}; a grad must match its param's dtype and shape")
    return _fake_value(op, params)


# sq_norm and l2_penalty get their autograd in C++ (csrc/autograd.cpp): a Python autograd.Function
# would cost more than the kernels. Their backward, l2_penalty_backward, is differentiable here.


def _backward_setup(ctx, inputs, output):
    grad, params, ctx.weight, ctx.weights = inputs
    ctx.save_for_backward(grad, *params)


def _backward_backward(ctx, grad_outs):
    # d/d(grad) and d/d(params) of grads_i = 2 * weight * w_i * grad * p_i: what double backward needs.
    # One gradient per argument the op was called with (ctx.needs_input_grad): the dispatcher drops a
    # weights=None equal to its default, and torch < 2.14 refuses a longer return.
    grad, *params = ctx.saved_tensors
    needs_grad, needs_params = ctx.needs_input_grad[:2]
    ws = ctx.weights if ctx.weights is not None else [1.0] * len(params)
    acc = grad.dtype
    d_grad = None
    if needs_grad:
        d_grad = sum((2.0 * ctx.weight * w * torch.sum(go.to(acc) * p.to(acc))
                      for go, p, w in zip(grad_outs, params, ws) if w != 0.0),
                     torch.zeros((), dtype=acc, device=grad.device)).reshape(grad.shape)
    d_params = [(2.0 * ctx.weight * w * grad.to(acc) * go.to(acc)).to(p.dtype) if needs else None
                for go, p, w, needs in zip(grad_outs, params, ws, needs_params)]
    return (d_grad, d_params, None, None)[:len(ctx.needs_input_grad)]


torch.library.register_autograd("l2fast::l2_penalty_backward", _backward_backward, setup_context=_backward_setup)


@torch.library.register_fake("l2fast::adamw_")
def _adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes, lr, beta1, beta2, eps,
                weight_decay, l2_weight, flags, lr_tensors, grad_scale=None, found_inf=None):
    # The op's list checks (csrc/adamw.cpp), so that traced code fails as eager code does; the value only.
    op = "l2fast.adamw_"
    n = len(params)
    for name, got in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("state_steps", state_steps)):
        if len(got) != n:
            raise ValueError(f"{op}: got {len(got)} {name} for {n} params; expected one per param")
    if sum(group_sizes) != n:
        raise ValueError(f"{op}: group_sizes add up to {sum(group_sizes)} but got {n} params; expected one entry "
                         "per param, group by group")
    for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
        for name, t in (("exp_avgs", m), ("exp_avg_sqs", v)):
            if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"{op}: {name}[{i}] is {t.dtype} {list(t.shape)} on {t.device} but its param is "
                                 f"{p.dtype} {list(p.shape)} on {p.device}; expected the param's")
    return _fake_value(op, params)
