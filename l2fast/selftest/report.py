"""What the report says about this machine (versions, device), the build check, and report.json / report.md."""
import json
import platform
import re

from .runner import Check, CheckFailed, skip_runs

TOOL = "l2fast.selftest"
FILES = ("report.json", "report.md")


def versions():
    import numpy
    import torch

    from .. import __version__

    v = {"l2fast": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
         "numpy": numpy.__version__, "platform": platform.platform(), "machine": platform.machine(),
         "torch_cuda": torch.version.cuda, "torch_threads": torch.get_num_threads()}
    try:
        import l2fast

        v["build"] = l2fast.build_info()
    except ImportError as e:
        v["build"] = f"not loaded: {e}"
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        v["gpu"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, " \
                   f"{props.multi_processor_count} SMs)"
    return v


def _archs(arch_list):
    """'9.0+PTX' / '8.0;9.0' / '8.0 9.0+PTX' -> (set of (major, minor) with SASS, set with PTX)."""
    sass, ptx = set(), set()
    for item in re.split(r"[;\s,]+", str(arch_list or "")):
        m = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", item.strip())
        if m:
            cc = (int(m.group(1)), int(m.group(2)))
            sass.add(cc)
            if m.group(3):
                ptx.add(cc)
    return sass, ptx


def build_check():
    def fn(ctx):
        import torch

        import l2fast

        info = l2fast.build_info()  # raises ImportError with the reason when _C did not load
        built = info.get("torch_version")
        if built and built != torch.__version__:
            raise CheckFailed(f"l2fast._C was built for torch {built} but torch {torch.__version__} is running")
        parts = [f"l2fast {l2fast.__version__} built for torch {built}", f"CPU {info.get('cpu_capability')}"]
        if info.get("cuda"):
            parts.append(f"CUDA {info.get('cuda_version')} archs {info.get('cuda_arch_list')}")
        else:
            parts.append("no CUDA kernels")
        if torch.cuda.is_available() and info.get("cuda") and "cuda" not in ctx.unavailable:
            cc = torch.cuda.get_device_capability()
            sass, ptx = _archs(info.get("cuda_arch_list"))
            runs = any(a[0] == cc[0] and a[1] <= cc[1] for a in sass) or any(a <= cc for a in ptx)
            if (sass or ptx) and not runs:
                raise CheckFailed(f"this GPU is sm_{cc[0]}{cc[1]} but l2fast was built for "
                                  f"{info.get('cuda_arch_list')}: its kernels cannot run here (rebuild with "
                                  "TORCH_CUDA_ARCH_LIST including it)")
            parts.append(f"GPU sm_{cc[0]}{cc[1]} {'(PTX JIT)' if cc not in sass else ''}".strip())
        return "; ".join(parts)

    return Check("build info and versions", fn, "any", always=True)


def as_json(report):
    return json.dumps(report, indent=2) + "\n"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


READING = """Every check runs l2fast's ops and compares what they return with a **float64 reference**. A
**tolerance** is the error a correct result may have: for a value, 1e-5 of it (summed in float32)
or 1e-12 (in float64); for a grad, half an ulp of its dtype (the rounding to float32, float16 or
bfloat16 that any kernel must make; an ulp is the gap between neighbouring numbers of that dtype)
plus 4 ulps of the float32 (float64) arithmetic before it, relative to |g| + |2·weight·p|. A row's
*worst error* is the largest error it saw as a fraction of its tolerance: 1.00 or less passes.
float16 and bfloat16 grads reach 1.00 because their tolerance is almost all that half-ulp rounding;
one of them off by a whole ulp reads 2, and fails. Skips for one reason share a row."""

# report.json's version keys, as the report's table names them
_VERSION_LABELS = {"torch_cuda": "torch's CUDA", "torch_threads": "torch threads", "build": "build",
                   "gpu": "GPU"}


def format_build(info):
    """l2fast.build_info() as words: `for torch 2.x; CPU kernels: AVX2; CUDA 13.0 kernels for 9.0+PTX`."""
    if not isinstance(info, dict):
        return str(info)  # `not loaded: ...`
    parts = [f"for torch {info.get('torch_version')}", f"CPU kernels: {info.get('cpu_capability') or 'default'}"]
    if info.get("cuda"):
        parts.append(f"CUDA {info.get('cuda_version')} kernels for {info.get('cuda_arch_list') or 'default archs'}")
    else:
        parts.append("no CUDA kernels")
    known = {"torch_version", "cpu_capability", "cuda", "cuda_version", "cuda_arch_list"}
    parts += [f"{k}: {v}" for k, v in info.items() if k not in known]
    return "; ".join(parts)


def _check_rows(checks):
    """The table's rows: one per check, but one per run of consecutive skips for the same reason."""
    rows = []
    for run in skip_runs(checks, status=lambda c: c["status"], detail=lambda c: c["detail"]):
        c = run[0]
        if len(run) > 1:
            names = ", ".join(x["name"] for x in run)
            seconds = sum(x["seconds"] for x in run)
            rows.append(f"| skip ({len(run)}) | {_cell(names)} | {seconds:.2f} | {_cell(c['detail'])} |")
        else:
            mark = {"pass": "pass", "fail": "**FAIL**", "skip": "skip"}[c["status"]]
            rows.append(f"| {mark} | {_cell(c['name'])} | {c['seconds']:.2f} | {_cell(c['detail'])} |")
    return rows


def as_markdown(report):
    s = report["summary"]
    lines = [f"# l2fast self-test{' (--quick)' if report['quick'] else ''}", "",
             f"**{s['fail']} failed, {s['pass']} passed, {s['skip']} skipped** in {report['seconds']:.0f} s; "
             f"devices tested: {', '.join(report['device']['tested']) or 'none'}"
             + (f" (cuda: {report['device']['cuda_skipped']})" if report["device"].get("cuda_skipped") else "")
             + ("" if report.get("complete", True) else
                "\n\n**Incomplete: the run stopped (or is still running) before its last check.**"), "",
             "## How to read this", "", READING, "",
             "## Versions", "", "| | |", "|---|---|"]
    for k, v in report["versions"].items():
        lines.append(f"| {_VERSION_LABELS.get(k, k)} | {_cell(format_build(v) if k == 'build' else v)} |")
    lines += ["", "## Checks", "", "| status | check | seconds | detail |", "|---|---|---:|---|"]
    lines += _check_rows(report["checks"])
    outputs = [c for c in report["checks"] if c.get("output")]
    if outputs:
        lines += ["", "## Outputs"]
        for c in outputs:
            lines += ["", f"### {c['name']}", "", "```", c["output"].rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def is_ours(folder):
    """True when `folder` holds nothing but a report this tool wrote (so rewriting it loses nothing)."""
    names = {p.name for p in folder.iterdir()}
    if not names or not names <= set(FILES) or "report.json" not in names:
        return False
    try:
        return json.loads((folder / "report.json").read_text()).get("tool") == TOOL
    except (OSError, ValueError, AttributeError):
        return False
