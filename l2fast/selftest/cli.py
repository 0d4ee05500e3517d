"""The command: options, where the report goes, which devices can be tested, then the checks."""
import tempfile
import time
from pathlib import Path

from .. import _cli, _io
from ..errors import UsageError
from . import report as rep
from .runner import DEFAULT_ESTIMATE, Context, run_checks


def parse_args(argv):
    p = _cli.ArgumentParser(prog=_cli.prog("l2fast.selftest", "l2fast-selftest"),
                            description="Prove that l2fast works on this machine, in one command, and leave a report "
                                        "(report.json, report.md) to attach to a bug report.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the CPU, and CUDA where a GPU and CUDA kernels are present (default); "
                        "cpu: CPU only; cuda: CUDA only (an error without a GPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for report.json and report.md (default: a new folder under the temp dir); "
                        "must be new or empty, or hold a report this tool wrote")
    p.add_argument("--overwrite", action="store_true",
                   help="use a non-empty --out anyway: only report.json and report.md are (re)written there")
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes and repeats and no benchmarks: under a minute on a 2-core CPU (CI runs it)")
    p.add_argument("--only", default="", metavar="NAMES",
                   help="comma-separated parts of check names: run only those (the others are listed as skipped)")
    p.add_argument("--skip", default="", metavar="NAMES", help="comma-separated parts of check names not to run")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="end within about SECONDS: a check whose estimate (on a 16-core machine with an H200) "
                        "does not fit the time left is skipped and reported as such; child processes are "
                        "stopped at the budget")
    p.add_argument("--list", action="store_true", help="print every check's name and estimate, run nothing")
    args = p.parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        raise UsageError(f"--budget {args.budget:g}: expected a positive number of seconds")
    return args


def check_out(out, overwrite):
    """Refuse (before any check runs) a report folder where writing could replace a user's file."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; expected a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not rep.is_ours(out):
        raise UsageError(f"--out {out}: the folder is not empty and holds no report of l2fast.selftest alone; "
                         "choose a new or empty folder, or pass --overwrite to (re)write only its report.json "
                         "and report.md")


def make_out(out):
    if out is None:
        return Path(tempfile.mkdtemp(prefix="l2fast-selftest-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _devices(requested):
    """(tested devices, {device: reason it is not tested}, error loading l2fast._C or None)."""
    import torch

    try:
        import l2fast.ops  # noqa: F401

        info = l2fast.build_info()
    except ImportError as e:
        reason = f"l2fast._C did not load: {e}"
        return [], {"cpu": reason, "cuda": reason}
    unavailable = {}
    if not torch.cuda.is_available():
        cuda_reason = "no CUDA device here (torch.cuda.is_available() is False)"
    elif not info.get("cuda"):
        cuda_reason = "this l2fast build has no CUDA kernels (built without nvcc)"
    else:
        cuda_reason = None
    if requested == "cuda" and cuda_reason:
        raise UsageError(f"--device cuda: {cuda_reason}; use --device auto or cpu")
    if requested == "cpu":
        cuda_reason = "--device cpu"
    if cuda_reason:
        unavailable["cuda"] = cuda_reason
    if requested == "cuda":
        unavailable["cpu"] = "--device cuda"
    return [d for d in ("cpu", "cuda") if d not in unavailable], unavailable


# Seconds on a 16-core machine with an H200, for the checks whose module does not
# set its own: matched by a part of the name, first match wins; DEFAULT_ESTIMATE otherwise.
ESTIMATES = (("torch.compile", 45.0), ("gradcheck", 6.0), ("opcheck", 6.0), ("1,000 tensors", 6.0),
             ("views", 4.0), ("determinism", 3.0), (" value", 3.0), (" accumulate", 3.0), (" fresh", 3.0),
             (" backward", 3.0))


def all_checks():
    from . import checks_cuda, checks_ops, checks_optim, checks_proc, checks_torch

    checks = [rep.build_check()]
    for device in ("cpu", "cuda"):
        checks += checks_ops.checks(device) + checks_torch.checks(device) + checks_optim.checks(device)
    checks += checks_cuda.checks() + checks_optim.cuda_checks() + checks_proc.checks()
    for check in checks:
        if check.estimate is None:
            check.estimate = next((sec for part, sec in ESTIMATES if part in check.name), None)
    return checks


def _names(text):
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _groups(checks):
    """The words that select several checks (devices, dtypes, modes, tools), in order of first use."""
    users = {}
    for c in checks:
        words = c.name.lower().replace(",", " ").replace(":", " ").split()
        rest = " ".join(words[1:] if words[0] in ("cpu", "cuda") else words)
        for word in words:
            if word[:1].isalpha() and len(word) >= 3 and word not in ("and", "per", "call", "more", "than"):
                users.setdefault(word, set()).add(rest)
    return [w for w, names in users.items() if len(names) >= 2]


def check_names(checks, only, skip):
    """A part given to --only or --skip that is in no check's name is a usage error (it would run or
    skip nothing, silently)."""
    for flag, parts in (("--only", only), ("--skip", skip)):
        for part in parts:
            if not any(part.lower() in c.name.lower() for c in checks):
                raise UsageError(f"{flag} {part}: matches no check; expected a part of a check name such as "
                                 f"{', '.join(_groups(checks))} (--list prints every check)")


def main(argv=None, extra_checks=()):
    began = time.monotonic()  # --budget counts from here
    args = parse_args(argv)
    checks = all_checks() + list(extra_checks)
    only, skip = _names(args.only), _names(args.skip)
    check_names(checks, only, skip)
    if args.list:
        for c in checks:
            print(f"{c.name}  (~{c.estimate or DEFAULT_ESTIMATE:.0f} s)")
        return 0
    check_out(args.out, args.overwrite)
    import torch

    tested, unavailable = _devices(args.device)
    out = make_out(args.out)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"l2fast self-test{' --quick' if args.quick else ''}: torch {torch.__version__}; testing "
          f"{', '.join(tested) or 'nothing'}" + (f" (cuda: {unavailable['cuda']})" if "cuda" in unavailable else ""),
          flush=True)

    def write(results, complete=False):
        # Rewritten after every check: a run cut short (a time limit, a crash) still leaves its rows.
        counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
        report = {
            "tool": rep.TOOL,
            "complete": complete,
            "device": {"requested": args.device, "tested": tested, "cuda_skipped": unavailable.get("cuda")},
            "versions": versions,
            "quick": args.quick,
            "budget": args.budget,
            "seconds": round(time.perf_counter() - start, 1),
            "summary": counts,
            "checks": [r.as_dict() for r in results] + ([] if complete else [
                {"name": c.name, "status": "skip", "detail": "not run: the self-test did not reach it", "seconds": 0}
                for c in checks[len(results):]]),
        }
        _io.atomic_write_text(out / "report.json", rep.as_json(report))
        _io.atomic_write_text(out / "report.md", rep.as_markdown(report))
        return report

    versions = rep.versions()
    with _cli.sigterm_raises(), tempfile.TemporaryDirectory(prefix="l2fast-selftest-work-") as tmp:  # as Ctrl-C
        ctx = Context(quick=args.quick, unavailable=unavailable, only=only, skip=skip, tmp=Path(tmp),
                      budget=args.budget, started=began)
        if "cuda" in tested:
            from . import checks_proc

            checks_proc.start_background(ctx)  # the sanitizers run beside the in-process checks
        results = run_checks(checks, ctx, on_result=write)
    report = write(results, complete=True)
    counts = report["summary"]
    print(f"{counts['fail']} failed, {counts['pass']} passed, {counts['skip']} skipped in {report['seconds']:.0f} s; "
          f"report: {out / 'report.md'}", flush=True)
    return 1 if counts["fail"] else 0


def cli(argv=None):
    return _cli.run(main, argv)
