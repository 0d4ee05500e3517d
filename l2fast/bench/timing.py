"""Timing shared by the benchmarks: torch.utils.benchmark.Timer (it synchronizes CUDA around its
clock), methods measured in interleaved rounds so machine noise hits every method alike, median kept."""
import logging
import statistics

import torch

# torch.utils.benchmark imports cpp_extension, which warns "No CUDA runtime is found" on a machine
# without a GPU: noise on stderr that turns every one-line bench error into two lines.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark  # noqa: E402


def time_call(fn, iters=1):
    """Seconds per call of fn(), averaged over `iters` back-to-back calls (Timer drains CUDA itself).
    Runs with torch's current thread count."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(iters).mean


def compare(methods, rounds=7, budget_s=0.05, warmup=3):
    """Median seconds per call for each named method, measured round-robin. `methods` maps
    name -> zero-argument callable; each round times about budget_s of calls per method."""
    if rounds < 1:
        raise ValueError(f"rounds {rounds}: expected at least 1")
    iters = {}
    for name, fn in methods.items():
        for _ in range(warmup):
            fn()
        one = max(time_call(fn, 1), 1e-7)
        iters[name] = max(1, min(10_000, int(budget_s / one)))
    samples = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            samples[name].append(time_call(fn, iters[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def interleaved(methods, steps, rounds):
    """Seconds per call of each method over `steps` calls split into `rounds` rounds, alternating
    the order every round: {name: [seconds per call in each round]}."""
    per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    times = {name: [] for name in methods}
    for r, n in enumerate(per_round):
        if n == 0:
            continue
        order = list(methods) if r % 2 == 0 else list(methods)[::-1]
        for name in order:
            times[name].append(time_call(methods[name], iters=n))
    return times
