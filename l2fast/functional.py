"""The functional API over torch.ops.l2fast.*: argument checks, then one fused kernel.

Semantics: this is the *coupled* L2 penalty of the seed notebook, weight * sum(w^2) added to the
loss, whose gradient 2 * weight * w then flows through the optimizer (Adam's moments included).
It is not AdamW's decoupled `weight_decay`, which shrinks weights outside the gradient.
"""
import numbers

import torch

from .ops import _BUILD_INFO, _KERNEL_DEVICES


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
