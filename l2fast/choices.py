"""The named choices of a training run: the penalty strategy, the AdamW implementation, the
data-parallel kind. Torch-free, so that `l2fast-train --help` lists them without importing torch;
l2fast.engine and l2fast.parallel act on them."""
import enum


class Penalty(str, enum.Enum):
    OPTIMIZER = "optimizer"  # l2fast.optim.AdamW(l2_weight=weight): the penalty inside the step, one pass
    FUSED = "fused"          # l2fast.l2_penalty_ after backward: grad += 2 * weight * p, returns the value
    AUTOGRAD = "autograd"    # l2fast.l2_penalty in the loss, differentiated by autograd
    REFERENCE = "reference"  # the notebook's torch.cat formula in the loss


PENALTIES = tuple(p.value for p in Penalty)
ADAMW_IMPLS = ("fused", "foreach", "default")
PARALLEL_KINDS = ("ddp", "fsdp")
