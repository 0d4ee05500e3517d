"""Data-parallel training under torchrun: the process group, the model wrapping, and the rank rules.

`torchrun --standalone --nproc_per_node=N -m l2fast.train --parallel ddp|fsdp` starts N ranks. Each
rank holds the whole dataset and draws the same permutation; a step's global batch (--batch-size)
is split over the ranks (torch.tensor_split: equal shares when it divides, which it must for full
batches; the last partial batch of an epoch differs by at most one example). The gradient stays the
global batch's mean: a rank's loss is its share's sum scaled by world / global count, which is its
own mean when the shares are equal, and DDP's / FSDP2's gradient averaging divides by world.

Rank 0 alone prints and writes. Errors found while setting up (`agree`) reach every rank, so no
rank waits in a collective for one that has given up. The process group is destroyed on the way
out, whatever the way. This module imports no CLI: library code, plain values in.
"""
import contextlib
import gc
import dataclasses
import datetime
import os

import torch

from .choices import PARALLEL_KINDS
from .errors import L2fastError, UsageError, describe

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting longer than this fails instead of hanging


def torchrun_env():
    """(rank, world size, local rank) from torchrun's environment, or None outside torchrun."""
    if not all(name in os.environ for name in TORCHRUN_ENV):
        return None
    try:
        return tuple(int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise UsageError(f"torchrun's environment is malformed: RANK={os.environ['RANK']!r}, "
                         f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}, LOCAL_RANK={os.environ['LOCAL_RANK']!r}") from None


def is_secondary():
    """True on a torchrun rank other than 0 (it prints and writes nothing)."""
    env = torchrun_env()
    return env is not None and env[0] != 0


def check(kind, batch_size):
    """UsageError unless `--parallel kind` fits the environment and the batch; returns the world size."""
    env = torchrun_env()
    if kind is None:
        if env is not None and env[1] > 1:
            raise UsageError(f"started by torchrun as {env[1]} processes but without --parallel: each would train "
                             f"alone and write its own run; add --parallel ddp or --parallel fsdp")
        return 1
    if kind not in PARALLEL_KINDS:
        raise UsageError(f"--parallel {kind}: expected one of {', '.join(PARALLEL_KINDS)}")
    if env is None:
        missing = ", ".join(name for name in TORCHRUN_ENV if name not in os.environ)
        raise UsageError(f"--parallel {kind} runs under torchrun (its environment lacks {missing}): "
                         f"torchrun --standalone --nproc_per_node=N -m l2fast.train --parallel {kind} ...")
    world = env[1]
    if batch_size % world:
        raise UsageError(f"--batch-size {batch_size}: does not split evenly over {world} ranks (torchrun "
                         f"--nproc_per_node / WORLD_SIZE={world}); use a multiple of {world}, e.g. "
                         f"{batch_size - batch_size % world or world}")
    return world


def resolve_device(name, local_rank):
    """The rank's device: cuda:LOCAL_RANK for auto (when CUDA is there) or cuda, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda":
        raise UsageError(f"--device {name} with --parallel: each rank uses cuda:LOCAL_RANK; pass --device cuda, "
                         f"cpu or auto")
    if not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here; use --device cpu (gloo)")
    if local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local_rank}: only {torch.cuda.device_count()} CUDA device(s) on this "
                         f"machine; start at most that many processes per node")
    return torch.device("cuda", local_rank)


@dataclasses.dataclass
class Context:
    """Where this process stands: kind None for a single process (rank 0 of 1)."""
    kind: str | None = None
    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None

    @property
    def is_main(self):
        return self.rank == 0

    def wrap(self, model):
        """The model as DDP or FSDP2 (fully_shard per Linear, then the root) wrap it; itself alone."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids, output_device=self.device if ids else None)
        if self.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model.modules():
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=self.mesh)
            fully_shard(model, mesh=self.mesh)
        return model

    def reduce_rows_(self, rows):
        """rows <- their mean over ranks, in place (one collective; no host sync with NCCL)."""
        if self.world > 1 and len(rows):
            torch.distributed.all_reduce(rows)  # gloo has no AVG: sum, then divide
            rows.div_(self.world)
        return rows

    def full_model(self, model, make_plain):
        """On rank 0, a plain model holding the whole trained weights (FSDP2's shards gathered to CPU);
        None on the other ranks. Every rank must call it (FSDP2 gathers collectively)."""
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not self.is_main:
                return None
            plain = make_plain()
            plain.load_state_dict(state)
            return plain
        if not self.is_main:
            return None
        return model.module if self.kind == "ddp" else model

    def agree(self, fn, *args, main_only=False):
        """fn(*args) on every rank (or rank 0 alone when main_only); when it raised an L2fastError or
        OSError on any rank, every rank raises it (rank 0 names the rank it came from), so that no rank
        is left waiting in a collective. Returns fn's result (None on ranks that skipped it)."""
        failure, result = None, None
        if self.is_main or not main_only:
            try:
                result = fn(*args)
            except (L2fastError, OSError) as e:
                if self.world == 1:
                    raise
                failure = (type(e) if isinstance(e, L2fastError) else UsageError, describe(e))
        if self.world == 1:
            return result
        failures = [None] * self.world
        torch.distributed.all_gather_object(failures, failure)
        for rank, f in enumerate(failures):
            if f is not None:
                cls, message = f
                error = cls(message if rank == 0 else f"rank {rank}: {message}")
                error.shared_by_ranks = True
                raise error
        return result


@contextlib.contextmanager
def shared_errors():
    """Marks an L2fastError raised inside as one every rank raises alike (rank 0 reports it; the others
    stay silent): the option checks, which read only the command line and the environment."""
    try:
        yield
    except L2fastError as e:
        e.shared_by_ranks = True
        raise


def reported_by_rank0(error):
    """True for an error rank 0 reports too (a secondary rank then exits without a word)."""
    return getattr(error, "shared_by_ranks", False)


@contextlib.contextmanager
def session(kind, device_name):
    """A Context for this process: for --parallel, the process group (gloo on CPU, NCCL on CUDA) and a
    1-D device mesh, destroyed on exit (also on errors). Call check() first."""
    if kind is None:
        yield None
        return
    rank, world, local_rank = torchrun_env()
    device = resolve_device(device_name, local_rank)
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    ctx = None
    try:
        from torch.distributed.device_mesh import init_device_mesh

        ctx = Context(kind, rank, world, device, init_device_mesh(device.type, (world,)) if kind == "fsdp" else None)
        yield ctx
    finally:
        # A DeviceMesh that outlives its process group until the interpreter's exit aborts the process
        # there ("terminate called without an active exception", about 1 exit in 4 with gloo): drop
        # ours first. An error's traceback may still hold the context, so clear it, not just our name.
        if ctx is not None:
            ctx.mesh = None
        gc.collect()
        dist.destroy_process_group()
