"""DTensor helpers for the penalty: local shards in, one global value out.

A DTensor parameter (FSDP2's `fully_shard`, HSDP, tensor parallel) is penalised through its local
shard: the fused kernel runs on the shards a rank holds, and the rank's partial sum becomes the
global value with an all-reduce over the mesh dimensions the parameter is *sharded* on. Its
`Replicate` dimensions (HSDP's replicas) are not reduced over: every replica already holds the
whole value of its shard group, and summing them would count each value once per replica. The
gradient 2·w·p of a shard is local and needs no communication.

Nothing here imports torch.distributed.tensor: no DTensor can exist until something else did.
"""
import sys

import torch


def dtensor_type():
    """The DTensor class when torch.distributed.tensor is loaded, else None (then no DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def reduce_dims(fn, where, param):
    """The mesh dimensions (of size > 1) that `param` is sharded on: those its partial sums cross."""
    mesh = param.device_mesh
    dims = []
    for dim, placement in enumerate(param.placements):
        if placement.is_shard():
            if mesh.size(dim) > 1:
                dims.append(dim)
        elif not placement.is_replicate():
            raise ValueError(f"l2fast.{fn}: {where} is a DTensor with placement {placement} on mesh dim {dim}; "
                             "expected Shard or Replicate placements (a Partial tensor holds unreduced values)")
    return tuple(dims)


def check_grad(fn, where, param):
    """A DTensor param's existing .grad must be a DTensor laid out like the param (FSDP2's are)."""
    grad = param.grad
    if grad is None:
        return
    cls = dtensor_type()
    if not isinstance(grad, cls) or grad.device_mesh != param.device_mesh or grad.placements != param.placements:
        got = f"a DTensor with placements {grad.placements}" if isinstance(grad, cls) else "a plain tensor"
        raise ValueError(f"l2fast.{fn}: {where}.grad is {got} but {where} is a DTensor with placements "
                         f"{param.placements} on {param.device_mesh}; expected a grad sharded like its param")


def all_reduce_sum_(value, mesh, dims):
    """Sums `value` in place over the process groups of mesh `dims` (one collective per dim)."""
    for dim in dims:
        torch.distributed.all_reduce(value, group=mesh.get_group(dim))
    return value


class _GlobalSum(torch.autograd.Function):
    """Forward: the sum of every rank's partial. Backward: identity, since d(global)/d(own partial) = 1
    and every rank differentiates only its own shards."""

    @staticmethod
    def forward(ctx, partial, mesh, dims):
        return all_reduce_sum_(partial.clone(), mesh, dims)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def global_sum(partial, mesh, dims):
    """The global value from this rank's partial, differentiable with respect to the partial."""
    if not dims:
        return partial
    if partial.requires_grad:
        return _GlobalSum.apply(partial, mesh, dims)
    return all_reduce_sum_(partial, mesh, dims)


def wrap_grad(param, local_grad):
    """A DTensor grad for `param` around a fresh local grad, laid out as `param` (no communication)."""
    return dtensor_type().from_local(local_grad, param.device_mesh, param.placements, run_check=False,
                                     shape=param.shape, stride=param.stride())
