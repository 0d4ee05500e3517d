"""`python -m l2fast.selftest`: prove an install on this machine in one command, and leave a report.

Runs its checks on the CPU and, where a GPU and CUDA kernels are present, on CUDA:
values and grads against float64 references for every dtype and mode, at chunk boundaries, on
views and zero-size tensors; aliasing rejections; determinism; opcheck; gradcheck; torch.compile;
and on CUDA one launch per call, no host sync, CUDA graphs, streams and threads, > 2^31 elements,
compute-sanitizer, a training-parity run and the benchmarks. Prints a table as it goes, writes
report.json and report.md, and exits 0 when no check failed (1 otherwise, 2 on a usage error).

Library entry points: `cli(argv)` (the command), `main(argv, extra_checks=())`, `Check`, `Skip`,
`run_checks(checks, ctx)`.
"""

from .runner import Check, CheckFailed, Context, Result, Skip, run_checks  # noqa: F401


def main(argv=None, extra_checks=()):
    from .cli import main as _main

    return _main(argv, extra_checks=extra_checks)


def cli(argv=None):
    from .cli import cli as _cli

    return _cli(argv)
