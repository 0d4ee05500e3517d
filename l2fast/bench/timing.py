"""Timing shared by the benchmarks: methods measured in interleaved rounds, median kept."""
import statistics
import time

import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, iters):
    """Seconds per call of fn(), averaged over `iters` back-to-back calls (CUDA events on GPU)."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def compare(methods, device, rounds=7, budget_s=0.05, warmup=3):
    """Median seconds per call for each named method, measured round-robin so that machine noise
    hits every method alike. `methods` maps name -> zero-argument callable."""
    iters = {}
    for name, fn in methods.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        one = max(time_call(fn, device, 1), 1e-7)
        iters[name] = max(1, min(10_000, int(budget_s / one)))
    samples = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            samples[name].append(time_call(fn, device, iters[name]))
    return {name: statistics.median(s) for name, s in samples.items()}
