"""What this CPU offers, asked in one place: the x86 features l2fast's AVX2 build uses (shared by
setup.py and the import check) and the CPUs this process may run on (the bound of every --threads).

Standard library only: setup.py loads this file by path, before torch and without importing l2fast.
"""
import os
import platform

AVX2_FEATURES = ("avx2", "fma", "f16c")  # what -mavx2 -mfma -mf16c let the compiler emit


def missing_avx2_features(cpuinfo="/proc/cpuinfo"):
    """The AVX2_FEATURES this CPU lacks (a sorted list, empty when it has them all).

    None when it cannot tell: not an x86-64 machine, or no readable cpuinfo (then setup.py builds
    the portable kernels and the import check has nothing to refuse on).
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open(cpuinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # One "flags" line per logical CPU; a feature counts only if every core has it.
    cores = [set(line.partition(":")[2].split()) for line in lines if line.split(":")[0].strip() == "flags"]
    if not cores:
        return None
    common = set.intersection(*cores)
    return sorted(set(AVX2_FEATURES) - common)


def max_threads():
    """The CPUs this process may run on (its affinity: fewer than the machine's under taskset or a
    container's cpuset), the most threads any l2fast option accepts."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
