"""The public l2fast API over torch.ops.l2fast.*: fake kernels, autograd, and argument checks.

Semantics: this is the *coupled* L2 penalty of the seed notebook, weight * sum(w^2) added to the
loss, whose gradient 2 * weight * w then flows through the optimizer (Adam's moments included).
It is not AdamW's decoupled `weight_decay`, which shrinks weights outside the gradient.
"""
import numbers

import torch

from . import _extension

_BUILD_INFO = _extension.load()
_KERNEL_DEVICES = ("cpu", "cuda") if _BUILD_INFO["cuda"] else ("cpu",)


def build_info():
    """What l2fast._C was built with: torch version, CUDA (bool, version, archs), CPU capability."""
    return dict(_BUILD_INFO)


def _tensor_list(fn, name, tensors):
    """`tensors` (any iterable, or one tensor) as a list, with a clear error for a bad element."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"l2fast.{fn}: {name}[{i}] is a {type(t).__name__}; expected a torch.Tensor")
    if tensors and not _on_kernel_device(tensors):
        hint = "" if _BUILD_INFO["cuda"] else " (this build has no CUDA kernels: rebuild where nvcc is available)"
        raise ValueError(f"l2fast.{fn}: {name}[0] is on {tensors[0].device}; l2fast has kernels for "
                         f"{' and '.join(_KERNEL_DEVICES)} tensors only{hint}")
    return tensors


def _on_kernel_device(params):
    if not params or not isinstance(params[0], torch.Tensor):
        return False
    return params[0].is_cpu or (params[0].is_cuda and _BUILD_INFO["cuda"])


def _weight(fn, weight):
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"l2fast.{fn}: weight is a {type(weight).__name__}; expected a real number")
    return float(weight)


def sq_norm(tensors):
    """Sum of x**2 over every element of every tensor, as a 0-dim tensor; differentiable.

    float64 if any input is float64, else float32 (accumulated in at least float32).
    """
    return torch.ops.l2fast.sq_norm(_tensor_list("sq_norm", "tensors", tensors))


def l2_penalty(params, weight):
    """weight * sum(||p||^2) over all params; differentiable, backward is one fused kernel."""
    return torch.ops.l2fast.l2_penalty(_tensor_list("l2_penalty", "params", params), _weight("l2_penalty", weight))


def l2_penalty_(params, weight):
    """The training fast path: `p.grad += 2 * weight * p` for every p, returning weight * sum(||p||^2).

    Each parameter is read once: value and gradient come from the same pass. A p whose .grad is
    None gets a fresh grad of 2 * weight * p. The returned value is detached. On bad input
    (mixed devices, a grad of the wrong shape/dtype/device, ...) it raises and modifies nothing.
    """
    # The per-call Python here is kept to a minimum: at the seed MLP's size it is ~2 of 13 µs.
    if type(params) is not list or not _on_kernel_device(params):
        params = _tensor_list("l2_penalty_", "params", params)
    grads = [p.grad for p in params]
    fresh = [i for i, g in enumerate(grads) if g is None]
    for i in fresh:
        grads[i] = torch.empty_like(params[i])
    try:
        value = _l2_penalty_inplace(params, grads, weight, fresh)
    except (RuntimeError, TypeError, ValueError):
        _tensor_list("l2_penalty_", "params", params)  # a clearer message for a non-tensor or device
        _weight("l2_penalty_", weight)
        raise
    for i in fresh:
        params[i].grad = grads[i]
    return value


_l2_penalty_inplace = torch.ops.l2fast.l2_penalty_.default


def _acc_dtype(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _fake_value(op, tensors):
    for i, t in enumerate(tensors):
        if t.device != tensors[0].device:
            raise ValueError(f"{op}: params[{i}] is on {t.device} but params[0] is on {tensors[0].device}; "
                             "all tensors must be on one device")
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty((), dtype=_acc_dtype(tensors), device=device)


@torch.library.register_fake("l2fast::sq_norm")
def _sq_norm_fake(tensors):
    return _fake_value("l2fast.sq_norm", tensors)


@torch.library.register_fake("l2fast::l2_penalty")
def _l2_penalty_fake(params, weight):
    return _fake_value("l2fast.l2_penalty", params)


@torch.library.register_fake("l2fast::l2_penalty_backward")
def _l2_penalty_backward_fake(grad, params, weight):
    return [torch.empty_like(p) for p in params]


@torch.library.register_fake("l2fast::l2_penalty_")
def _l2_penalty_inplace_fake(params, grads, weight, fresh=()):
    op = "l2fast.l2_penalty_"
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
    grad, params, ctx.weight = inputs
    ctx.save_for_backward(grad, *params)


def _backward_backward(ctx, grad_outs):
    # d/d(grad) and d/d(params) of grads_i = 2w * grad * p_i: what double backward needs.
    grad, *params = ctx.saved_tensors
    two_w = 2.0 * ctx.weight
    acc = grad.dtype
    d_grad = sum(torch.sum(go.to(acc) * p.to(acc)) for go, p in zip(grad_outs, params)) * two_w
    d_params = [(two_w * grad.to(acc) * go.to(acc)).to(p.dtype) for go, p in zip(grad_outs, params)]
    return torch.as_tensor(d_grad, dtype=acc, device=grad.device).reshape(grad.shape), d_params, None


torch.library.register_autograd("l2fast::l2_penalty_backward", _backward_backward, setup_context=_backward_setup)
