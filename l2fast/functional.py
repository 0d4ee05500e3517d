"""The functional API over torch.ops.l2fast.*: argument checks, param groups, DTensors, then fused kernels.

Semantics: this is the *coupled* L2 penalty of the seed notebook, weight * sum(w^2) added to the
loss, whose gradient 2 * weight * w then flows through the optimizer (Adam's moments included).
It is not AdamW's decoupled `weight_decay`, which shrinks weights outside the gradient.

`params` is one tensor, a list of tensors, or a list of param groups in torch.optim's form,
`[{"params": [...], "weight": 0.01}, {"params": [...], "weight": 0.0}]`; a group without "weight"
takes the call's `weight`. All groups go through one kernel launch (a per-tensor weight); the
tensors of a weight-0 group are not read. DTensor params (FSDP2, HSDP) are penalised through their
local shards, one launch per mesh, and the value is the global one (see l2fast.distributed).
"""
import inspect
import math
import numbers

import torch

from . import distributed
from .ops import _BUILD_INFO, _KERNEL_DEVICES, _acc_dtype

_OWN_GROUP_KEYS = frozenset({"params", "weight"})
# Keys an optimizer or LR scheduler writes into the same group dicts (torch.optim mutates them).
_FOREIGN_GROUP_KEYS = frozenset({"param_names", "initial_lr", "name"})
_optimizer_keys = None


def _tensor_list(fn, name, tensors):
    """`tensors` (any iterable, or one tensor) as a list, with a clear error for a bad element."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for i, t in enumerate(tensors):
        _check_tensor(fn, f"{name}[{i}]", t)
    return tensors


def _check_tensor(fn, where, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"l2fast.{fn}: {where} is a {type(t).__name__}; expected a torch.Tensor")
    dtensor = distributed.dtensor_type()
    local = t.to_local() if dtensor is not None and isinstance(t, dtensor) else t
    if local.layout != torch.strided:
        raise ValueError(f"l2fast.{fn}: {where} is a {str(local.layout).replace('torch.', '')} tensor; "
                         "l2fast's kernels take dense (strided) tensors only")
    if local.is_quantized:
        raise ValueError(f"l2fast.{fn}: {where} is a quantized tensor ({local.dtype}); l2fast's kernels take "
                         "dense floating-point tensors only")
    if not (local.is_cpu or (local.is_cuda and _BUILD_INFO["cuda"])):
        hint = "" if _BUILD_INFO["cuda"] else " (this build has no CUDA kernels: rebuild where nvcc is available)"
        raise ValueError(f"l2fast.{fn}: {where} is on {local.device}; l2fast has kernels for "
                         f"{' and '.join(_KERNEL_DEVICES)} tensors only{hint}")


def _on_kernel_device(params):
    if not params or not isinstance(params[0], torch.Tensor):
        return False
    return params[0].is_cpu or (params[0].is_cuda and _BUILD_INFO["cuda"])


def _weight(fn, weight, where="weight", nonnegative=False):
    """`weight` as a float, or a one-line error naming `where`; `nonnegative`: 0 or more (the optimizer's)."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise TypeError(f"l2fast.{fn}: {where} is a {type(weight).__name__}; expected a real number")
    expected = "a finite number >= 0" if nonnegative else "a finite real number"
    try:
        weight = float(weight)
    except OverflowError:  # an int or Fraction beyond float's range: named briefly, not in 400 digits
        text = str(weight)
        short = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"
        raise ValueError(f"l2fast.{fn}: {where} is {short}, beyond the float range; expected {expected}") from None
    if not math.isfinite(weight) or (nonnegative and weight < 0):
        raise ValueError(f"l2fast.{fn}: {where} is {weight}; expected {expected}")
    return weight


def _allowed_foreign_keys():
    """Every hyperparameter name of torch.optim's optimizers: a group shared with one carries them."""
    global _optimizer_keys
    if _optimizer_keys is None:
        keys = set(_FOREIGN_GROUP_KEYS)
        for cls in vars(torch.optim).values():
            if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
                keys.update(inspect.signature(cls.__init__).parameters)
        _optimizer_keys = frozenset(keys - {"self", "params", "args", "kwargs"})
    return _optimizer_keys


def parse(fn, params, weight):
    """Checks `params` (tensors or groups) and `weight` before anything runs. Returns
    ([(param, w, where)] for every param to read, [every param]): the params of weight 0 (a weight-0
    group, or a plain list with weight 0) are not read, as the op reads no tensor of effective weight 0.
    Raises TypeError/ValueError naming the culprit."""
    if weight is not None:
        weight = _weight(fn, weight)
    if isinstance(params, (torch.Tensor, dict)):
        params = [params]
    elif isinstance(params, (str, bytes)) or not hasattr(params, "__iter__"):
        raise TypeError(f"l2fast.{fn}: params is a {type(params).__name__}; expected a tensor, a list of "
                        "tensors or a list of param groups (dicts with 'params' and 'weight')")
    items = list(params)
    if not any(isinstance(item, dict) for item in items):
        if weight is None:
            raise TypeError(f"l2fast.{fn}: no weight given; a list of tensors needs the call's weight "
                            "(only param groups carry their own)")
        names = [f"params[{i}]" for i in range(len(items))]
        for t, where in zip(items, names):
            _check_tensor(fn, where, t)
        return ([(t, weight, where) for t, where in zip(items, names)] if weight != 0.0 else []), items
    out, everything, seen = [], [], {}
    for g, group in enumerate(items):
        if not isinstance(group, dict):
            raise TypeError(f"l2fast.{fn}: params[{g}] is a {type(group).__name__} but other elements are "
                            "param groups (dicts); pass tensors or groups, not both")
        unknown = sorted(set(group) - _OWN_GROUP_KEYS - _allowed_foreign_keys(), key=str)
        if unknown:
            raise ValueError(f"l2fast.{fn}: params[{g}] has the unknown key {unknown[0]!r}; a group takes "
                             "'params' and 'weight' (and the keys torch.optim puts there, which are ignored)")
        if "params" not in group:
            raise ValueError(f"l2fast.{fn}: params[{g}] has no 'params'; expected "
                             "{'params': [tensors], 'weight': float}")
        w = group.get("weight", weight)
        if w is None:
            raise TypeError(f"l2fast.{fn}: params[{g}] has no 'weight' and the call gives no default weight")
        w = _weight(fn, w, f"params[{g}]['weight']")
        members = group["params"]
        if isinstance(members, set):
            raise TypeError(f"l2fast.{fn}: params[{g}]['params'] is a set, whose order changes between runs; "
                            "expected a list")
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        for i, t in enumerate(members):
            where = f"params[{g}]['params'][{i}]"
            _check_tensor(fn, where, t)
            if id(t) in seen:
                raise ValueError(f"l2fast.{fn}: {where} is also {seen[id(t)]}; a parameter may be in one group only")
            seen[id(t)] = where
            everything.append(t)
            if w != 0.0:
                out.append((t, w, where))
    return out, everything


class Part:
    """One kernel launch: plain tensors (mesh None), or the DTensors of one mesh reduced over `dims`.
    `weights` is None when every tensor has the same weight `weight` (then the op scales by it)."""

    __slots__ = ("params", "names", "weight", "weights", "mesh", "dims")

    def __init__(self, params, names, weights, mesh=None, dims=()):
        self.params, self.names, self.mesh, self.dims = params, names, mesh, dims
        uniform = all(w == weights[0] for w in weights)
        self.weight = weights[0] if uniform and weights else 1.0
        self.weights = None if uniform else weights


def plan(fn, pairs):
    """Splits [(param, w, where)] into launches: plain tensors first, then one Part per (mesh, sharded dims)."""
    dtensor = distributed.dtensor_type()
    plain, sharded = ([], [], []), {}
    for param, w, where in pairs:
        if dtensor is not None and isinstance(param, dtensor):
            key = (param.device_mesh, distributed.reduce_dims(fn, where, param))
            bucket = sharded.setdefault(key, ([], [], []))
        else:
            bucket = plain
        bucket[0].append(param)
        bucket[1].append(where)
        bucket[2].append(w)
    parts = [Part(*plain)] if plain[0] else []
    parts += [Part(*bucket, mesh=mesh, dims=dims) for (mesh, dims), bucket in sharded.items()]
    return parts


def locals_of(part):
    """The tensors the kernel reads: the params, or their local shards (differentiable under grad mode)."""
    return part.params if part.mesh is None else [p.to_local() for p in part.params]


def run_inplace(tensors, grads, weight, fresh, weights):
    """The l2_penalty_ op, with per-tensor weights when they differ: one launch either way."""
    if weights is None:
        return _l2_penalty_inplace(tensors, grads, weight, fresh)
    return _l2_penalty_inplace(tensors, grads, weight, fresh, weights)


def run_value(tensors, weight, weights):
    """The differentiable l2_penalty op, with per-tensor weights when they differ."""
    if weights is None:
        return torch.ops.l2fast.l2_penalty(tensors, weight)
    return torch.ops.l2fast.l2_penalty(tensors, weight, weights)


def check_grads(fn, parts):
    """Before the first launch writes anything: every existing grad must fit its param, so that no
    later launch can fail after an earlier one wrote (the op checks this too, one launch at a time)."""
    for part in parts:
        for p, where in zip(part.params, part.names):
            if part.mesh is not None:
                distributed.check_grad(fn, where, p)
                g, p = (p.grad.to_local() if p.grad is not None else None), p.to_local()
            else:
                g = p.grad
            if g is not None and (g.shape != p.shape or g.dtype != p.dtype or g.device != p.device):
                raise ValueError(f"l2fast.{fn}: {where}.grad is {g.dtype} {list(g.shape)} on {g.device} but "
                                 f"{where} is {p.dtype} {list(p.shape)} on {p.device}; expected a matching grad")


def add_grad_parts(parts):
    """Runs l2_penalty_ over each Part (grads of DTensors through their local shards); the summed value."""
    total = None
    for part in parts:
        params = part.params
        if part.mesh is None:
            tensors, grads = params, [p.grad for p in params]
        else:
            tensors = [p.to_local() for p in params]
            grads = [None if p.grad is None else p.grad.to_local() for p in params]
        fresh = [i for i, g in enumerate(grads) if g is None]
        for i in fresh:
            grads[i] = torch.empty_like(tensors[i])
        value = run_inplace(tensors, grads, part.weight, fresh, part.weights)
        for i in fresh:
            params[i].grad = grads[i] if part.mesh is None else distributed.wrap_grad(params[i], grads[i])
        if part.mesh is not None:
            value = distributed.global_sum(value, part.mesh, part.dims)
        total = value if total is None else total + value
    return total


def value_parts(parts):
    """The (differentiable) value over each Part, DTensor partials made global; the summed value."""
    total = None
    for part in parts:
        value = run_value(locals_of(part), part.weight, part.weights)
        if part.mesh is not None:
            value = distributed.global_sum(value, part.mesh, part.dims)
        total = value if total is None else total + value
    return total


def add_grad(fn, parts, everything):
    """l2_penalty_ over `parts`, every grad checked before the first launch writes; the zero value
    when there is nothing to read."""
    if not parts:
        return zero_value(everything)
    check_grads(fn, parts)
    with torch.no_grad():
        return add_grad_parts(parts)


def value_of(parts, everything):
    """The (differentiable) value over `parts`; the zero value when there is nothing to read."""
    return value_parts(parts) if parts else zero_value(everything)


def zero_value(tensors):
    """The value of a call with nothing to read, typed and placed as the op's would be."""
    return torch.zeros((), dtype=_acc_dtype(tensors), device=tensors[0].device if tensors else "cpu")


def sq_norm(tensors):
    """Sum of x**2 over every element of every tensor, as a 0-dim tensor; differentiable.

    float64 if any input is float64, else float32 (accumulated in at least float32). DTensors
    give the global sum over their shards.
    """
    try:
        return torch.ops.l2fast.sq_norm(tensors)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        tensors = _tensor_list("sq_norm", "tensors", tensors)
        parts = plan("sq_norm", [(t, 1.0, f"tensors[{i}]") for i, t in enumerate(tensors)])
        if not any(part.mesh is not None for part in parts):
            return torch.ops.l2fast.sq_norm(tensors)
        return value_parts(parts)


def l2_penalty(params, weight=None):
    """weight * sum(||p||^2) over all params, or over param groups with their own weights (then
    `weight` is the default of groups without one, and may be omitted when every group has its own);
    differentiable, backward is one fused kernel. DTensor params give the global value, and the
    gradient of each local shard (the value is the same on every rank). Params of weight 0 are not
    read, and are not in the value's graph."""
    if type(params) is list and _on_kernel_device(params) and type(weight) is float and math.isfinite(weight) and weight:
        try:
            return torch.ops.l2fast.l2_penalty(params, weight)
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            pass  # groups, DTensors or bad input: the full path below says which
    pairs, everything = parse("l2_penalty", params, weight)
    return value_of(plan("l2_penalty", pairs), everything)


def l2_penalty_(params, weight=None):
    """The training fast path: `p.grad += 2 * weight * p` for every p, returning weight * sum(||p||^2).

    `params` may be param groups (each with its own "weight", `weight` being the default of groups
    without one: it may be omitted when every group has its own) and DTensors (FSDP2/HSDP: local
    shards, global value). Params of weight 0 (a group's, or the call's) are not read and their grads
    are left as they are (a None grad stays None). Each
    parameter is read once: value and gradient come from the same pass. A p whose .grad is None
    gets a fresh grad of 2 * weight * p. The returned value is detached. On bad input (mixed
    devices, a grad of the wrong shape/dtype/device, a bad group, ...) it raises and modifies nothing.
    """
    # The per-call Python of a plain list is kept to a minimum: at the seed MLP's size it is ~2 of 13 µs.
    if type(params) is list and _on_kernel_device(params) and type(weight) is float and math.isfinite(weight) and weight:
        try:
            grads = [p.grad for p in params]
            fresh = [i for i, g in enumerate(grads) if g is None]
            for i in fresh:
                grads[i] = torch.empty_like(params[i])
            value = _l2_penalty_inplace(params, grads, weight, fresh)
        except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError):
            pass  # groups, DTensors or bad input: the full path below says which
        else:
            for i in fresh:
                params[i].grad = grads[i]
            return value
    pairs, everything = parse("l2_penalty_", params, weight)
    return add_grad("l2_penalty_", plan("l2_penalty_", pairs), everything)


_l2_penalty_inplace = torch.ops.l2fast.l2_penalty_.default
