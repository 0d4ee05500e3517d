"""`l2fast.optim.AdamW`: torch's AdamW with the seed's coupled L2 penalty inside the step, in one pass.

    optimizer = l2fast.optim.AdamW(model.parameters(), lr=1e-3, l2_weight=1e-4)
    loss.backward()
    optimizer.step()            # AdamW with g + 2·l2_weight·p, in one pass over memory
    optimizer.penalty           # l2_weight·Σ‖p‖² of the params before this step (no host sync)

A step behaves as if `w·Σ‖p‖²` had been added to the loss before `backward()`: each param's
gradient becomes `g + 2·w·p` (formed in registers, never written to `.grad`) and goes through
AdamW's moments, while AdamW's own `weight_decay` stays its decoupled decay. Both can be used
together. Param groups carry their L2 weight as "weight" (as `l2fast.decay_groups` and
`L2Penalty` do); a group without it takes `l2_weight`.

Which params a step touches, as with the penalty in the loss: a param with a grad is updated;
a param without one (grad None) whose weight is not 0 and that requires grad is updated with the
penalty's gradient alone (the loss term would have given it that gradient); a frozen param
(requires_grad False) is not updated but its w·‖p‖² is in the value, as it is in the seed's loss.
With `maximize=True` the penalty's gradient is added after the data gradient is negated, as
torch's Adam adds its coupled `weight_decay`: the penalty still pulls the weights toward 0.
"""
import sys

import torch
from torch.optim.optimizer import Optimizer

from . import distributed
from . import functional as F
from .ops import _acc_dtype

__all__ = ["AdamW"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_AMSGRAD, _MAXIMIZE = 1, 2  # the op's per-group flags


def _check_hyperparameters(group, where=""):
    """torch.optim.AdamW's checks with torch's words (`where` names a group), then the L2 weight's."""
    lr, betas = group["lr"], group["betas"]
    if isinstance(lr, torch.Tensor):
        if group["foreach"] and not group["capturable"]:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True" + where)
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element" + where)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}{where}")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"Invalid epsilon value: {group['eps']}{where}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}{where}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}{where}")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}{where}")
    if not (isinstance(betas[0], float) and isinstance(betas[1], float)
            or isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor)):
        raise ValueError("betas must be either both floats or both Tensors" + where)
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor) and b.numel() != 1:
            raise ValueError(f"Tensor betas[{i}] must be 1-element{where}")
    if group["differentiable"]:
        raise ValueError("l2fast.optim.AdamW: differentiable=True (autograd through the step) is not supported; "
                         "use torch.optim.AdamW(differentiable=True)" + where)
    if group["fused"] and group["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together." + where)
    F._weight("optim.AdamW", group["weight"], f"{where.strip(' ()')}['weight']" if where else "l2_weight",
              nonnegative=True)


def _scalar(x):
    """A hyperparameter as a Python float (a Tensor beta is read on the host)."""
    return float(x) if isinstance(x, torch.Tensor) else x


class _Launch:
    """The op's arguments for the params of one kernel launch: plain tensors, or the local shards of
    the DTensors of one (mesh, sharded dims)."""

    def __init__(self, n_groups, mesh=None, dims=()):
        self.mesh, self.dims = mesh, dims
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.maxes, self.steps = [], [], [], [], [], []
        self.sizes = [0] * n_groups

    def add(self, k, p, grad, state, amsgrad):
        local = (lambda t: t) if self.mesh is None else (lambda t: t if t is None else t.to_local())
        self.params.append(local(p))
        self.grads.append(local(grad))
        self.exp_avgs.append(local(state["exp_avg"]))
        self.exp_avg_sqs.append(local(state["exp_avg_sq"]))
        if amsgrad:
            self.maxes.append(local(state["max_exp_avg_sq"]))
        self.steps.append(state["step"])
        self.sizes[k] += 1


class AdamW(Optimizer):
    """torch.optim.AdamW with the coupled L2 penalty `w·Σ‖p‖²` applied inside the step (see the module doc).

    Every argument torch.optim.AdamW has keeps its meaning and default (`weight_decay` is AdamW's
    decoupled decay). `l2_weight` is the coupled L2 weight of groups without their own "weight".
    `foreach` and `fused` are accepted and change nothing (the step is always one fused pass);
    `differentiable=True` is refused. `capturable=True`: `lr` may be a tensor on the params'
    device, read there at every step (CUDA graphs); every step is capturable in any case.

    `optimizer.penalty`: after each step, `Σ wᵢ·‖pᵢ‖²` of the params as they were before it, a 0-dim
    tensor on the params' device (float32, float64 when any param is float64), without a host
    sync; None before the first step. For DTensor params (FSDP2, HSDP) it is the global value.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 l2_weight=0.0, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
                    "maximize": maximize, "foreach": foreach, "capturable": capturable,
                    "differentiable": differentiable, "fused": fused, "decoupled_weight_decay": True,
                    "weight": l2_weight}
        _check_hyperparameters(defaults)
        self.penalty = None
        self._direct = _C._adamw_cache()
        super().__init__(params, defaults)
        # GradScaler hands the scale and the inf flag to step() (grad_scale, found_inf), as to torch's
        # fused optimizers: the step unscales in the same pass and skips the update on an inf.
        self._step_supports_amp_scaling = True

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("penalty", None)
        self._direct = _C._adamw_cache()  # not pickled: a new, empty validation cache
        for group in self.param_groups:
            group.setdefault("weight", self.defaults.get("weight", 0.0))
            group["decoupled_weight_decay"] = True

    def add_param_group(self, param_group):
        """torch's add_param_group, then the hyperparameters checked (torch's words), the group's
        "weight" too, and every param's dtype and device: before the group is kept."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        where = f" (param_groups[{len(self.param_groups)}])"
        trial = {**self.defaults, **param_group}
        if "betas" in param_group:
            trial["betas"] = tuple(param_group["betas"])
        _check_hyperparameters(trial, where)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["betas"] = tuple(group["betas"])
            self._check_params(len(self.param_groups) - 1)
        except BaseException:
            self.param_groups.pop()
            raise

    def _check_params(self, k):
        first = next((p for g in self.param_groups for p in g["params"]), None)
        for i, p in enumerate(self.param_groups[k]["params"]):
            where = f"param_groups[{k}]['params'][{i}]"
            if p.dtype not in _DTYPES:
                raise TypeError(f"l2fast.optim.AdamW: {where} has dtype {p.dtype}; expected float32, float64, float16 "
                                "or bfloat16 (torch.optim.AdamW takes other dtypes)")
            if p.device != first.device:
                there = next(f"param_groups[{j}]['params'][{n}]" for j, g in enumerate(self.param_groups)
                             for n, q in enumerate(g["params"]) if q is first)
                raise ValueError(f"l2fast.optim.AdamW: {where} is on {p.device} but {there} is on {first.device}; "
                                 "one optimizer takes the params of one device")

    def load_state_dict(self, state_dict):
        """torch's load_state_dict (a torch.optim.AdamW checkpoint loads too); groups saved without an
        L2 "weight" keep this optimizer's. Every step becomes a float32 tensor on its param's device."""
        saved = state_dict["param_groups"]
        if len(saved) == len(self.param_groups):
            for k, (group, s) in enumerate(zip(self.param_groups, saved)):
                trial = {**group, **{key: v for key, v in s.items() if key != "params"}}
                trial["betas"] = tuple(trial["betas"])
                _check_hyperparameters(trial, f" (saved param_groups[{k}])")
        weights = [None if "weight" in s else g["weight"] for g, s in zip(self.param_groups, saved)]
        super().load_state_dict(state_dict)
        for group, w in zip(self.param_groups, weights):
            if w is not None:
                group["weight"] = w
            group["betas"] = tuple(group["betas"])
            group["decoupled_weight_decay"] = True
            for p in group["params"]:
                state = self.state.get(p)
                if state and "step" in state:
                    state["step"] = self._step_tensor(p, state["step"])

    @staticmethod
    def _step_tensor(p, step):
        """A step as the kernels keep it: a float32 0-dim tensor on the param's (local) device."""
        device = (p.to_local() if isinstance(p, distributed.dtensor_type() or ()) else p).device
        if isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.device == device and step.dim() == 0:
            return step
        return torch.tensor(float(step), dtype=torch.float32, device=device)

    def _init_state(self, p, amsgrad):
        state = self.state[p]
        if "step" not in state:
            state["step"] = self._step_tensor(p, 0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            state["step"] = self._step_tensor(p, state["step"])
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def step(self, closure=None):
        """One AdamW step of every param with the penalty's gradient added; `self.penalty` its value.

        Runs torch's step hooks (and the profiler's label) as every torch optimizer does."""
        if (torch.compiler.is_compiling() or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS or torch.autograd._profiler_enabled()):
            return _HOOKED_STEP(self, closure)
        return _step(self, closure)

    step.hooked = True  # torch's Optimizer must not wrap it again: the hooks run above

    @torch.no_grad()
    def _step_slow(self):
        """The step through torch.ops.l2fast.adamw_: state initialisation, DTensors, any device or mode."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        dtensor = distributed.dtensor_type()
        n_groups = len(self.param_groups)
        launches, frozen, everything = {}, [], []
        for k, group in enumerate(self.param_groups):
            w, amsgrad = group["weight"], group["amsgrad"]
            F._weight("optim.AdamW", w, f"param_groups[{k}]['weight']", nonnegative=True)
            for i, p in enumerate(group["params"]):
                everything.append(p)
                grad = p.grad
                if grad is None:
                    if w == 0:
                        continue  # as torch: no grad, no update
                    if not p.requires_grad:  # frozen: in the value, not updated
                        frozen.append((p, w, f"param_groups[{k}]['params'][{i}]"))
                        continue
                if grad is not None and grad.is_sparse:
                    raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam instead")
                key = None
                if dtensor is not None and isinstance(p, dtensor):
                    key = (p.device_mesh, distributed.reduce_dims("optim.AdamW", f"param_groups[{k}]['params'][{i}]", p))
                    distributed.check_grad("optim.AdamW", f"param_groups[{k}]['params'][{i}]", p)
                launch = launches.get(key)
                if launch is None:
                    launch = launches[key] = _Launch(n_groups, *(key or ()))
                launch.add(k, p, grad, self._init_state(p, amsgrad), amsgrad)
        total = None
        for launch in launches.values():
            value = self._run(launch, grad_scale, found_inf)
            if launch.mesh is not None:
                value = distributed.global_sum(value, launch.mesh, launch.dims)
            total = value if total is None else total + value
        if frozen:
            value = F.value_parts(F.plan("optim.AdamW", frozen))
            total = value if total is None else total + value
        if total is None:
            return F.zero_value(everything)
        dtype = _acc_dtype(everything)
        return total if total.dtype == dtype else total.to(dtype)

    def _run(self, launch, grad_scale, found_inf):
        groups = self.param_groups
        device = launch.params[0].device
        lr_tensors = [None] * len(groups)
        lrs = []
        for k, g in enumerate(groups):
            lr = g["lr"]
            if isinstance(lr, torch.Tensor):
                if lr.device == device or lr.is_cpu:
                    lr_tensors[k] = lr.reshape(()) if lr.dtype in (torch.float32, torch.float64) else lr.reshape(()).double()
                else:
                    lr_tensors[k] = lr.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
                lr = 0.0
            lrs.append(lr)

        def on_device(t):
            return None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())

        grads = launch.grads
        if torch.compiler.is_compiling() and any(g is None for g in grads):
            # auto_functionalize (torch <= 2.14) fails on a None in a mutable Tensor?[]: a zero grad is the
            # same data gradient (the penalty's alone), a temporary here.
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(launch.params, grads)]
        return torch.ops.l2fast.adamw_(
            launch.params, grads, launch.exp_avgs, launch.exp_avg_sqs, launch.maxes, launch.steps, launch.sizes,
            lrs, [_scalar(g["betas"][0]) for g in groups], [_scalar(g["betas"][1]) for g in groups],
            [g["eps"] for g in groups], [g["weight_decay"] for g in groups], [float(g["weight"]) for g in groups],
            [_AMSGRAD * bool(g["amsgrad"]) | _MAXIMIZE * bool(g["maximize"]) for g in groups],
            lr_tensors if any(t is not None for t in lr_tensors) else [], on_device(grad_scale), on_device(found_inf))


def _step(self, closure):
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    # The direct call (csrc/python.cpp) runs the kernel on plain CPU/CUDA tensors whose state exists,
    # outside any mode or compiler; it returns None for everything else, which the op path handles.
    value = None
    if not torch.compiler.is_compiling():
        attrs = self.__dict__
        value = _adamw_direct(self.param_groups, self.state, attrs.get("grad_scale"), attrs.get("found_inf"),
                              self._direct)
    self.penalty = self._step_slow() if value is None else value
    return loss


_C = sys.modules[__package__ + "._C"]  # loaded by functional's import of ops
_adamw_direct = _C._adamw_step_
_HOOKED_STEP = Optimizer.profile_hook_step(_step)  # torch's own hook and profiler wrapper
_optimizer_module = sys.modules[Optimizer.__module__]
_GLOBAL_PRE_HOOKS = _optimizer_module._global_optimizer_pre_hooks
_GLOBAL_POST_HOOKS = _optimizer_module._global_optimizer_post_hooks
