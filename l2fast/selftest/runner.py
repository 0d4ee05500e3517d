"""Running checks: each one timed, its outcome a Result (pass, fail or skip), a table row printed as it ends."""
import dataclasses
import sys
import time
import traceback


class Skip(Exception):
    """Raised by a check that cannot run here; the message is the reason."""


class CheckFailed(AssertionError):
    """Raised by a check whose result is wrong; the message says what was expected and what came,
    `output` (optional) is a multi-line text for the report (a table of what was compared)."""

    def __init__(self, message, output=None):
        super().__init__(message)
        self.output = output


@dataclasses.dataclass
class Check:
    """One row of the report. `fn(ctx)` returns a one-line detail (or (detail, output) where output is a
    multi-line text such as a benchmark table), raises Skip(reason), or raises on failure.
    `device` names what it needs ("cuda": skipped with the reason where CUDA is unavailable);
    `bench`: skipped by --quick; `estimate`: the seconds it takes on a 16-core machine with an
    H200 (None: DEFAULT_ESTIMATE), which --budget compares with the time left."""

    name: str
    fn: object
    device: str = "cpu"
    bench: bool = False
    always: bool = False  # run even when --only/--skip would leave it out (the build row)
    estimate: float = None


@dataclasses.dataclass
class Result:
    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str
    seconds: float
    output: str = None

    def as_dict(self):
        d = {"name": self.name, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 3)}
        if self.output:
            d["output"] = self.output
        return d


@dataclasses.dataclass
class Context:
    """What every check may use: `unavailable` maps a device to the reason it cannot be tested."""

    quick: bool = False
    unavailable: dict = dataclasses.field(default_factory=dict)
    only: tuple = ()
    skip: tuple = ()
    tmp: object = None  # a pathlib.Path to a scratch folder this run owns
    stream: object = None  # where the table goes (default sys.stdout)
    state: dict = dataclasses.field(default_factory=dict)  # shared between checks (processes started early)
    cleanup: list = dataclasses.field(default_factory=list)  # callables run when the checks end, whatever happens
    budget: float = None  # seconds the whole run may take (--budget), counted from `started`
    started: float = dataclasses.field(default_factory=time.monotonic)

    def time_left(self):
        """Seconds left of --budget (None without one)."""
        return None if self.budget is None else self.budget - (time.monotonic() - self.started)


DEFAULT_ESTIMATE = 2.0


def _one_line(text, limit=400):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_selected(name, ctx):
    """Why --only/--skip leave the check `name` out, or None."""
    lname = name.lower()
    if ctx.only and not any(p.lower() in lname for p in ctx.only):
        return "not selected by --only " + ",".join(ctx.only)
    if any(p.lower() in lname for p in ctx.skip):
        return "deselected by --skip " + ",".join(ctx.skip)
    return None


def run_check(check, ctx):
    """Run one check and return its Result; an exception in the check is a failure, never a crash."""
    reason = (None if check.always else not_selected(check.name, ctx)) or ctx.unavailable.get(check.device)
    if reason is None and check.bench and ctx.quick:
        reason = "--quick skips the benchmarks"
    left = ctx.time_left()
    estimate = DEFAULT_ESTIMATE if check.estimate is None else check.estimate
    if reason is None and left is not None and not check.always and estimate > left:
        reason = f"--budget {ctx.budget:g}: needs about {estimate:.0f} s, {max(left, 0):.0f} s left"
    if reason is not None:
        return Result(check.name, "skip", reason, 0.0)
    start = time.perf_counter()
    output = None
    try:
        out = check.fn(ctx)
        if isinstance(out, tuple):
            out, output = out
        status, detail = "pass", out or "ok"
    except Skip as e:
        status, detail = "skip", str(e)
    except Exception as e:  # noqa: BLE001 - any error in a check is that check's failure
        status = "fail"
        where = traceback.extract_tb(e.__traceback__)
        at = f" (at {where[-1].name}:{where[-1].lineno})" if where else ""
        kind = "" if isinstance(e, CheckFailed) else f"{type(e).__name__}: "
        detail = f"{kind}{e}{at}"
        output = getattr(e, "output", None) if isinstance(e, CheckFailed) else None
    return Result(check.name, status, _one_line(detail), time.perf_counter() - start, output)


HEADER = f"{'status':<6} {'seconds':>8}  {'check':<46} detail"
# Above the table: what "worst error X of tolerance" means (report.md's "How to read this" says more).
READING = ("Errors against float64 references are fractions of a tolerance, the error a correct result may have; "
           "1.00 or less passes,\nand float16/bfloat16 grads reach 1.00 by their own rounding (report.md explains). "
           "Skips for one reason share a line.")


def format_row(r):
    return f"{r.status:<6} {r.seconds:>8.2f}  {r.name:<46} {r.detail}"


def skip_runs(rows, status=lambda r: r.status, detail=lambda r: r.detail):
    """`rows` cut into runs: consecutive skips with the same reason together, every other row alone."""
    runs = []
    for r in rows:
        last = runs[-1] if runs else None
        if (last and status(r) == "skip" and status(last[0]) == "skip"
                and detail(r) == detail(last[0])):
            last.append(r)
        else:
            runs.append([r])
    return runs


def group_label(names):
    """`41 cuda checks` (their shared first word) or `3 checks`."""
    first = {name.split(" ", 1)[0] for name in names}
    return f"{len(names)} {first.pop() + ' ' if len(first) == 1 else ''}checks"


def format_run(run):
    """One table line for a run of skips with one reason (or a row alone)."""
    if len(run) == 1:
        return format_row(run[0])
    seconds = sum(r.seconds for r in run)
    return f"{'skip':<6} {seconds:>8.2f}  {group_label([r.name for r in run]):<46} {run[0].detail}"


def run_checks(checks, ctx, on_result=None):
    """Run the checks in order, printing each row as it ends (consecutive skips for one reason as one
    line, once the run of them ends), and calling on_result(results so far); returns every Result."""
    stream = ctx.stream or sys.stdout
    print(READING, file=stream, flush=True)
    print(HEADER, file=stream, flush=True)
    print("-" * len(HEADER), file=stream, flush=True)
    results, pending = [], []  # pending: skips for one reason, not printed yet

    def flush():
        if pending:
            print(format_run(pending), file=stream, flush=True)
            pending.clear()

    try:
        for check in checks:
            r = run_check(check, ctx)
            results.append(r)
            if pending and not (r.status == "skip" and r.detail == pending[0].detail):
                flush()
            if r.status == "skip":
                pending.append(r)
            else:
                print(format_row(r), file=stream, flush=True)
            if on_result is not None:
                on_result(results)
        flush()
    finally:
        for fn in ctx.cleanup:
            fn()
    return results
