"""`L2Penalty`, built once beside the optimizer, and `decay_groups`, the usual decay/no-decay split.

Both speak torch.optim's param-group form, `[{"params": [...], "weight": 0.01}, ...]`: the same
list can feed `torch.optim.AdamW(groups, weight_decay=0.0)` (which ignores "weight") and
`L2Penalty(groups)` (which ignores the optimizer's keys). The penalty is the *coupled* L2 of the
seed notebook (weight * sum(p^2) in the loss); give the optimizer `weight_decay=0.0` unless you
also want AdamW's decoupled decay on top.
"""
import operator
import sys

import torch
from torch import nn

from . import functional as F

_MISSING = object()

# Parameters of these layers get weight 0 whatever their shape (LayerNorm over 2 dims has a 2-D weight).
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


def decay_groups(model, weight, exclude=None):
    """`[{"params": decay, "weight": weight}, {"params": no_decay, "weight": 0.0}]` for `model`.

    nanoGPT's rule: a parameter with >= 2 dimensions (matmul and conv weights, embeddings) is
    penalised; biases, normalisation-layer parameters and every other 1-D (or 0-D) parameter get
    weight 0, as does any parameter for which `exclude(name, param)` is true. Frozen parameters
    (requires_grad False) are left out of both groups; a parameter shared by two modules is listed
    once. The groups feed torch.optim unchanged (it keeps "weight" as an unused key).
    """
    weight = F._weight("decay_groups", weight)
    if exclude is not None and not callable(exclude):
        raise TypeError(f"l2fast.decay_groups: exclude is a {type(exclude).__name__}; expected a callable "
                        "(name, param) -> bool")
    if not isinstance(model, nn.Module):
        raise TypeError(f"l2fast.decay_groups: model is a {type(model).__name__}; expected a torch.nn.Module")
    in_norm = {id(p) for m in model.modules() if isinstance(m, _NORM_LAYERS) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or id(p) in in_norm or name.rsplit(".", 1)[-1] == "bias"
        if not skip and exclude is not None:
            skip = bool(exclude(name, p))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight": weight}, {"params": no_decay, "weight": 0.0}]


class L2Penalty:
    """The coupled L2 penalty over params or param groups, prepared once and cheap per call.

        penalty = l2fast.L2Penalty(l2fast.decay_groups(model, 1e-4))
        ...
        loss.backward()
        penalty.add_grad_()     # p.grad += 2·w·p for every p of weight w != 0; returns the value
        optimizer.step()

    `.add_grad_()` adds 2·w·p into each `.grad` (creating the grads that are None) and returns the
    value, detached; `.value()` returns the value and writes nothing; `penalty()` returns the
    differentiable term, to add to a loss before backward. A weight-0 group is not read at all.

    `params` is a list of tensors with a `weight`, or torch.optim-style groups (a group without
    "weight" takes `weight`). Like torch.optim, the group dicts are kept, not copied: a change to a
    group's "params" list or "weight", or a group appended to `param_groups`, is seen at the next
    call. Params are held as objects, so `p.data = ...`, `torch.utils.swap_tensors` and fresh grads
    (`zero_grad(set_to_none=True)`) need nothing. DTensor params (FSDP2, HSDP) are penalised through
    their local shards; the value is the global one on every rank (see l2fast.distributed).
    """

    def __init__(self, params, weight=None):
        self._weight = None if weight is None else F._weight("L2Penalty", weight)
        items = [params] if isinstance(params, (torch.Tensor, dict)) else list(params)
        if any(isinstance(g, dict) for g in items):  # groups (a mix is rejected by parse)
            self.param_groups = items
        else:
            if self._weight is None:
                raise TypeError("l2fast.L2Penalty: no weight given; a list of tensors needs one "
                                "(only param groups carry their own)")
            self.param_groups = [{"params": items}]
        self._build()

    @property
    def weight(self):
        """The default weight of groups without their own "weight" (None: every group has one)."""
        return self._weight

    @weight.setter
    def weight(self, value):
        self._weight = None if value is None else F._weight("L2Penalty", value)
        self._build()

    def _build(self):
        groups = self.param_groups
        for g in groups:  # as torch.optim does: a group's params become a list, kept in the dict
            if isinstance(g, dict) and "params" in g and not isinstance(g["params"], (list, set)):
                g["params"] = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
        pairs, self._everything = F.parse("L2Penalty", groups, self._weight)
        self._parts = F.plan("L2Penalty", pairs)
        self._watch = tuple((g, g["params"], tuple(g["params"]), g.get("weight", _MISSING), tuple(g)) for g in groups)
        one = self._parts[0] if len(self._parts) == 1 and self._parts[0].mesh is None else None
        self._direct = None if one is None else (  # _C._add_grad_'s arguments after param_groups
            self._watch, _MISSING, list(one.params), one.weight, None if one.weights is None else torch.tensor(one.weights, dtype=torch.float64),
            _C._validated())

    def _follow_traced(self):
        # A method of its own: a change then costs one new graph, against three with the graph break
        # inside add_grad_ (measured), and dynamo's recompile limit (8 per frame) lasts longer.
        if self._changed():
            _build_eagerly(self)

    def _changed(self):
        """_stale for torch.compile: by content (keys, weights, params), which dynamo's guards follow, so
        that a later change recompiles. Not by the identity of the dicts and lists: a rebuild that left
        the same content (the lists torch.optim makes anew) would not change what the guards see, and
        the traced "changed" branch would rebuild on every call."""
        groups = self.param_groups
        if len(groups) != len(self._watch):
            return True
        for g, (_, _, snapshot, w, keys) in zip(groups, self._watch):
            members = g.get("params")
            if (tuple(g) != keys or g.get("weight", _MISSING) != w or type(members) is not list
                    or len(members) != len(snapshot) or not all(map(operator.is_, members, snapshot))):
                return True
        return False

    def _stale(self):
        groups = self.param_groups
        if len(groups) != len(self._watch):
            return True
        for g, (watched, members, snapshot, w, keys) in zip(groups, self._watch):
            if (g is not watched or len(g) != len(keys) or not all(map(operator.is_, g, keys))
                    or g["params"] is not members or g.get("weight", _MISSING) is not w
                    or len(members) != len(snapshot) or not all(map(operator.is_, members, snapshot))):
                return True
        return False

    def add_grad_(self):
        """`p.grad += 2·w·p` for every penalised p (a None grad becomes 2·w·p); returns the value, detached."""
        if torch.compiler.is_compiling():  # traced: the op goes into the graph
            self._follow_traced()
            return F.add_grad("L2Penalty", self._parts, self._everything)
        # The direct call (csrc/python.cpp) checks that the groups are unchanged, as _stale does; it
        # returns None when they changed, under a mode or with a tensor that is not plain.
        if self._direct is not None:
            value = _add_grad_direct(self.param_groups, *self._direct)
            if value is not None:
                return value
        if self._stale():
            self._build()
            if self._direct is not None:
                value = _add_grad_direct(self.param_groups, *self._direct)
                if value is not None:
                    return value
        return F.add_grad("L2Penalty", self._parts, self._everything)

    def value(self):
        """The penalty's value (global over DTensor shards), detached; nothing is written."""
        with torch.no_grad():
            return self()

    def __call__(self):
        """The penalty as a differentiable term: `(loss + penalty()).backward()` adds its gradient."""
        if torch.compiler.is_compiling():
            self._follow_traced()
        elif self._stale():
            self._build()
        return F.value_of(self._parts, self._everything)

    def __getstate__(self):
        # The groups and the default weight; the launches and the direct call's validation cache (a
        # capsule) are rebuilt by __setstate__, so that a deep copy penalises the copied tensors.
        return {"param_groups": self.param_groups, "weight": self._weight}

    def __setstate__(self, state):
        self.param_groups, self._weight = state["param_groups"], state["weight"]
        self._build()

    def __repr__(self):
        sizes = ", ".join(f"{len(g['params'])} params × {g.get('weight', self._weight)}" for g in self.param_groups)
        return f"L2Penalty({sizes})"


_C = sys.modules[__package__ + "._C"]  # loaded by functional's import of ops
_add_grad_direct = _C._add_grad_
# A rebuild under torch.compile runs outside the graph (parse's checks and _C._validated are not
# traceable): a graph break, only in the trace that finds the groups changed. torch._disable_dynamo
# is torch.compiler.disable that imports dynamo at the first call, not here.
_build_eagerly = torch._disable_dynamo(L2Penalty._build)
