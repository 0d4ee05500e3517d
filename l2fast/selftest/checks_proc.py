"""Checks that run other processes: compute-sanitizer on a driver, the training-parity runs and
the benchmarks. Every process has a timeout, and its output tail goes into the failure's detail."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .runner import Check, CheckFailed, Skip, not_selected

SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SANITIZER_EXIT = 86


def _env(**extra):
    """The environment for a child: it imports the same l2fast as this process."""
    import l2fast

    env = dict(os.environ)
    root = str(Path(l2fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def _tail(text, lines=6):
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def _run(cmd, ctx, timeout, cwd=None, env=None):
    start = time.perf_counter()
    limit = _deadline(ctx, timeout) - time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=limit,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        raise _out_of_time(ctx, f"`{' '.join(map(str, cmd[-6:]))}` ({_tail(out, 2)})", limit) from None
    return proc, time.perf_counter() - start


# --- compute-sanitizer -----------------------------------------------------------------------------

def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "compute-sanitizer"), os.X_OK):
            return os.path.join(home, "bin", "compute-sanitizer")
    return None


class _Background:
    """A child process writing to a log file (no pipe to fill up), killed when the self-test ends."""

    def __init__(self, cmd, log, ctx, env=None):
        self.log, self.cmd = log, cmd
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=ctx.tmp, env=env or _env(), stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.start = time.monotonic()
        ctx.cleanup.append(self.kill)

    def wait(self, deadline):
        """(exit code or None on timeout, output, seconds)."""
        try:
            rc = self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        return rc, Path(self.log).read_text(errors="replace"), time.monotonic() - self.start

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


SANITIZER_SECONDS = 540
BUDGET_MARGIN = 5.0  # seconds kept for writing the report after the last child is stopped


def _deadline(ctx, seconds):
    """time.monotonic() by which a child must end: `seconds` from now, or sooner under --budget."""
    left = ctx.time_left()
    if left is not None:
        seconds = min(seconds, left - BUDGET_MARGIN)
    return time.monotonic() + max(seconds, 1.0)


def _out_of_time(ctx, what, seconds):
    """The check's outcome when its child was stopped: a skip if --budget stopped it, else a failure."""
    if ctx.budget is not None:
        return Skip(f"--budget {ctx.budget:g}: {what} stopped after {seconds:.0f} s, at the end of the budget")
    return CheckFailed(f"{what}: still running after {seconds:.0f} s")


def start_background(ctx):
    """Start the long child processes now (those selected), so that they run beside the in-process
    checks: the compute-sanitizer runs and the training-parity runs."""
    _sanitizers(ctx)
    if "cuda" not in ctx.unavailable and not_selected(TRAIN_PARITY, ctx) is None:
        _train_runs(ctx)


def _sanitizers(ctx):
    """All the selected sanitizer runs, started together on first use: four tools at once take the
    time of the slowest rather than the sum."""
    if "sanitizers" not in ctx.state:
        exe, runs = find_sanitizer(), {}
        if exe is not None and "cuda" not in ctx.unavailable:
            for tool in SANITIZER_TOOLS:
                if not_selected(sanitizer_name(tool), ctx) is not None:
                    continue
                # memcheck: without the caching allocator every tensor is its own allocation, so an
                # access past a tensor's end is caught rather than landing in a neighbour (CUDA graphs
                # need the allocator, so the driver leaves them out there).
                env = _env(PYTORCH_NO_CUDA_MEMORY_CACHING="1") if tool == "memcheck" else _env()
                cmd = [exe, "--tool", tool, "--error-exitcode", str(SANITIZER_EXIT), "--print-limit", "20",
                       sys.executable, "-m", "l2fast.selftest.driver", "cuda"]
                runs[tool] = _Background(cmd, ctx.tmp / f"sanitizer-{tool}.log", ctx, env)
        ctx.state["sanitizers"] = (exe, runs, _deadline(ctx, SANITIZER_SECONDS))
    return ctx.state["sanitizers"]


def sanitizer_name(tool):
    return f"cuda compute-sanitizer {tool}"


def sanitizer_check(tool):
    def fn(ctx):
        exe, runs, deadline = _sanitizers(ctx)
        if exe is None:
            raise Skip("compute-sanitizer is not on PATH (nor in $CUDA_HOME/bin or /usr/local/cuda/bin)")
        rc, out, seconds = runs[tool].wait(deadline)
        if rc is None:
            raise _out_of_time(ctx, f"{tool} (all tools run at once; {_tail(out, 2)})", seconds)
        summary = [line.strip("= ").strip() for line in out.splitlines() if "SUMMARY" in line]
        if rc != 0 or "selftest driver: ok" not in out:
            errors = [line.strip("= ").strip() for line in out.splitlines()
                      if line.startswith("=========") and "SUMMARY" not in line and line.strip("= ")][:8]
            why = f"exit {rc}" + (" (sanitizer errors)" if rc == SANITIZER_EXIT else "")
            raise CheckFailed(f"{tool}: {why}: {' | '.join(errors) or _tail(out)}")
        return f"{'; '.join(summary) or 'no errors'} ({seconds:.0f} s under {tool})"

    # It waits for a child started beside the in-process checks, at most until the budget ends.
    return Check(sanitizer_name(tool), fn, "cuda", estimate=0.0)


# --- training parity -------------------------------------------------------------------------------

TRAIN_RUNS = {
    "cuda eager": ["--device", "cuda"],
    "cuda --cuda-graphs": ["--device", "cuda", "--cuda-graphs"],
    "cuda --compile": ["--device", "cuda", "--compile"],
    "cpu": ["--device", "cpu"],
}
LOSS_RTOL = 1e-4
TRAIN_SECONDS = 600


def _losses(path):
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "step" in r}


TRAIN_PARITY = "cuda train parity: eager, graphs, compile, cpu"


def _train_runs(ctx):
    """The four training runs, started together on first use: they share nothing but the machine."""
    if "train" not in ctx.state:
        steps = 60 if ctx.quick else 200  # 200 crosses the sample's 125-step epoch: a new permutation
        common = ["--max-steps", str(steps), "--log-every", "10", "--dataset", "sample", "--no-progress"]
        runs = {}
        for name, flags in TRAIN_RUNS.items():
            tag = name.replace(" ", "_").replace("-", "")
            metrics = ctx.tmp / f"train-{tag}.jsonl"
            cmd = [sys.executable, "-m", "l2fast.train", *flags, *common, "--out", str(ctx.tmp / f"run-{tag}"),
                   "--metrics", str(metrics)]
            runs[name] = (_Background(cmd, ctx.tmp / f"train-{tag}.log", ctx), metrics)
        ctx.state["train"] = (steps, runs, _deadline(ctx, TRAIN_SECONDS))
    return ctx.state["train"]


def train_parity_check():
    def fn(ctx):
        steps, runs, deadline = _train_runs(ctx)
        losses, failures = {}, []
        for name, (run, metrics) in runs.items():
            rc, out, seconds = run.wait(deadline)
            if rc is None:
                raise _out_of_time(ctx, f"{name} training ({_tail(out, 2)})", seconds)
            if rc != 0:
                failures.append(f"{name}: exit {rc}: {_tail(out, 3)}")
            else:
                losses[name] = _losses(metrics)
        if failures:
            raise CheckFailed("; ".join(failures))
        base = losses["cuda eager"]
        if len(base) < steps // 10:
            raise CheckFailed(f"cuda eager logged {len(base)} losses; expected {steps // 10}")
        worst = {}
        for name, got in losses.items():
            if sorted(got) != sorted(base):
                raise CheckFailed(f"{name} logged steps {sorted(got)}; cuda eager logged {sorted(base)}")
            worst[name] = max(abs(got[s] - base[s]) / abs(base[s]) for s in base)
        rows = [f"{s:>6} " + " ".join(f"{losses[n][s]:>20.7f}" for n in losses) for s in sorted(base)]
        table = f"{'step':>6} " + " ".join(f"{n:>20}" for n in losses) + "\n" + "\n".join(rows)
        summary = ", ".join(f"{n} {w:.1e}" for n, w in worst.items() if n != "cuda eager")
        if any(not w <= LOSS_RTOL for w in worst.values()):
            raise CheckFailed(f"logged losses differ from cuda eager by more than {LOSS_RTOL:.0e} relative: "
                              f"{summary}", output=table)
        return f"{steps} steps, {len(base)} logged losses; max relative difference to cuda eager: {summary}", table

    # Started beside the in-process checks (start_background); the check waits, at most until the budget ends.
    return Check(TRAIN_PARITY, fn, "cuda", estimate=0.0)


# --- benchmarks ------------------------------------------------------------------------------------

def bench_check(name, args, timeout=600, estimate=60.0):
    def fn(ctx):
        cmd = [sys.executable, "-m", "l2fast.bench", *args]
        proc, seconds = _run(cmd, ctx, timeout, cwd=ctx.tmp)
        if proc.returncode != 0:
            raise CheckFailed(f"`python -m l2fast.bench {' '.join(args)}` exit {proc.returncode}: "
                              f"{_tail(proc.stdout + proc.stderr)}")
        return f"`python -m l2fast.bench {' '.join(args)}` in {seconds:.0f} s; table in report.md", proc.stdout

    return Check(name, fn, "cuda", bench=True, estimate=estimate)


def checks():
    return [*(sanitizer_check(t) for t in SANITIZER_TOOLS), train_parity_check(),
            bench_check("cuda bench penalty", ["penalty", "--device", "cuda"], estimate=90.0),
            bench_check("cuda bench train", ["train", "--device", "cuda"], estimate=40.0),
            bench_check("cuda bench train --cuda-graphs", ["train", "--device", "cuda", "--cuda-graphs"], estimate=40.0)]
