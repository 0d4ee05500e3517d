"""`python -m l2fast.selftest`: the quick run passes on this machine, a wrong result is a failure
with exit 1, and the report folder never costs the user a file."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import l2fast
from helpers import PKG_ROOT
from l2fast.selftest import Check, Context, Skip, checks_ops, main, refs, run_checks
from l2fast.selftest.cli import cli

CUDA = torch.cuda.is_available()


def _report(folder):
    return json.loads((folder / "report.json").read_text())


@pytest.mark.slow
def test_quick_run_passes_and_reports(tmp_path):
    out = tmp_path / "report"
    # Where a GPU is present, keep this test short: the CUDA checks are the self-test's own business.
    device = ["--device", "cpu"] if CUDA else []
    proc = subprocess.run([sys.executable, "-m", "l2fast.selftest", "--quick", "--out", str(out), *device],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(PKG_ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = _report(out)
    assert report["tool"] == "l2fast.selftest" and report["quick"] is True
    assert set(report["device"]) >= {"requested", "tested"} and report["device"]["tested"] == ["cpu"]
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["l2fast"] == l2fast.__version__
    checks = report["checks"]
    for c in checks:
        assert set(c) >= {"name", "status", "detail", "seconds"}
        assert c["status"] in ("pass", "fail", "skip") and isinstance(c["detail"], str) and c["detail"]
        assert isinstance(c["seconds"], (int, float)) and c["seconds"] >= 0
    names = [c["name"] for c in checks]
    assert len(names) == len(set(names))
    assert [c for c in checks if c["status"] == "fail"] == []
    cpu = {c["name"]: c for c in checks if c["name"].startswith("cpu ")}
    expected = [f"cpu {refs.dtype_name(d)} {m}" for d in refs.DTYPES for m in checks_ops.MODES] + [
        "cpu non-contiguous views", "cpu zero-size tensors", "cpu 1,000 tensors", "cpu aliasing rejected",
        "cpu determinism", "cpu torch.library.opcheck", "cpu gradcheck", "cpu torch.compile(fullgraph=True)"]
    assert all(cpu[name]["status"] == "pass" for name in expected), {n: cpu[n]["detail"] for n in expected
                                                                    if cpu[n]["status"] != "pass"}
    cuda = [c for c in checks if c["name"].startswith("cuda ")]
    assert len(cuda) >= 30  # every CUDA check is listed ...
    assert all(c["status"] == "skip" for c in cuda)  # ... as skipped, with its reason
    reason = "--device cpu" if CUDA else "no CUDA device"
    assert all(reason in c["detail"] for c in cuda)
    assert {c["name"] for c in checks} >= {"cuda compute-sanitizer memcheck", "cuda bench penalty",
                                           "cuda more than 2^31 elements"}
    md = (out / "report.md").read_text()
    assert "| status | check | seconds | detail |" in md and "cpu float16 accumulate" in md
    assert "0 failed" in proc.stdout and proc.stdout.count("\npass ") >= len(expected)


class _WrongValue(refs.Reference):
    """A reference off by 1e-4 relative: ten times the float32 tolerance."""

    def sq_norm(self, tensors, weights=None):
        return super().sq_norm(tensors, weights) * (1 + 1e-4)


class _WrongGrad(refs.Reference):
    def grad(self, g_old, p, scale):
        return super().grad(g_old, p, scale * (1 + 1e-3))


@pytest.mark.parametrize("mode,ref,words", [("value", _WrongValue(), "float64 reference"),
                                             ("accumulate", _WrongGrad(), "expected")])
def test_a_wrong_result_fails_with_exit_1(tmp_path, mode, ref, words):
    check = checks_ops.values_check("cpu", torch.float32, mode, ref=ref)
    check.name = "injected: " + check.name
    rc = main(["--device", "cpu", "--quick", "--only", "injected", "--out", str(tmp_path / "r")], extra_checks=[check])
    assert rc == 1
    results = {c["name"]: c for c in _report(tmp_path / "r")["checks"]}
    assert results[check.name]["status"] == "fail" and words in results[check.name]["detail"]
    assert results["build info and versions"]["status"] == "pass"  # the build row always runs
    others = [c for name, c in results.items() if name not in (check.name, "build info and versions")]
    assert others and all(c["status"] == "skip" and "--only" in c["detail"] for c in others)


def test_runner_outcomes():
    def boom(ctx):
        raise RuntimeError("kernel exploded")

    def skipped(ctx):
        raise Skip("not here")

    def with_output(ctx):
        return "fine", "a table\n"

    ctx = Context(stream=io.StringIO(), unavailable={"cuda": "no GPU"})
    checks = [Check("a", boom), Check("b", skipped), Check("c", with_output), Check("d", boom, "cuda")]
    results = run_checks(checks, ctx)
    assert [r.status for r in results] == ["fail", "skip", "pass", "skip"]
    assert "RuntimeError: kernel exploded" in results[0].detail
    assert results[1].detail == "not here" and results[3].detail == "no GPU"
    assert results[2].as_dict()["output"] == "a table\n"
    assert "kernel exploded" in ctx.stream.getvalue()


def test_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli(["--out", str(out), "--only", "build"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and err.count("\n") == 1 and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    # --overwrite writes only its two files; the user's file stays.
    assert cli(["--out", str(out), "--only", "build", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.json", "report.md"]
    assert (out / "notes.txt").read_text() == "keep me"

    # A folder holding only its own report is rewritten without being told.
    own = tmp_path / "own"
    assert cli(["--out", str(own), "--only", "build"]) == 0
    assert cli(["--out", str(own), "--only", "build"]) == 0
    assert sorted(p.name for p in own.iterdir()) == ["report.json", "report.md"]

    # ... but not one whose report.json is someone else's.
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text('{"tool": "something else"}')
    assert cli(["--out", str(other), "--only", "build"]) == 2
    assert (other / "report.json").read_text() == '{"tool": "something else"}'

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli(["--out", str(a_file)]) == 2 and a_file.read_text() == "x"


def test_usage_errors_are_one_line(capsys):
    assert cli(["--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    if not CUDA:
        assert cli(["--device", "cuda", "--only", "build"]) == 2
        err = capsys.readouterr().err
        assert "--device cuda" in err and err.count("\n") == 1


def test_only_or_skip_matching_no_check_is_a_usage_error(tmp_path, capsys):
    """`--only typo` used to run nothing and exit 0 (issue 18 item 16)."""
    for flag in ("--only", "--skip"):
        out = tmp_path / flag.strip("-")
        assert cli([flag, "cpu float32 value,typo", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} typo: ") and err.count("\n") == 1, err
        assert "sanitizer" in err and "cpu" in err  # the groups a name may match
        assert not out.exists()


def test_budget_skips_what_would_not_fit(tmp_path):
    """--budget: a check whose estimate does not fit the time left is skipped, and says so."""
    ran = []

    def quick(ctx):
        ran.append("quick")
        return "done"

    def slow(ctx):
        ran.append("slow")
        return "done"

    checks = [Check("injected quick", quick, estimate=1), Check("injected slow", slow, estimate=10_000)]
    rc = main(["--device", "cpu", "--only", "injected", "--budget", "60", "--out", str(tmp_path / "r")],
              extra_checks=checks)
    assert rc == 0 and ran == ["quick"]
    results = {c["name"]: c for c in _report(tmp_path / "r")["checks"]}
    assert results["injected quick"]["status"] == "pass"
    slow_row = results["injected slow"]
    assert slow_row["status"] == "skip" and "--budget 60" in slow_row["detail"] and "10000 s" in slow_row["detail"]


def _report_of(results, versions=None):
    """A report dict as l2fast.selftest writes it, for the given Results."""
    from l2fast.selftest import report as rep

    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    return {"tool": rep.TOOL, "complete": True, "device": {"requested": "auto", "tested": ["cpu"],
                                                          "cuda_skipped": "no GPU"},
            "versions": versions or {"torch": "2.x"}, "quick": True, "seconds": 1.0, "summary": counts,
            "checks": [r.as_dict() for r in results]}


def test_skips_for_one_reason_are_one_line_in_the_table_and_the_report():
    """41 rows of `no CUDA device here` made report.md 91 lines long."""
    from l2fast.selftest import report as rep

    def ok(ctx):
        return "worst error 0.50 of tolerance"

    checks = [Check("cpu a", ok)] + [Check(f"cuda {n}", ok, "cuda") for n in ("a", "b", "c")] + [
        Check("cpu b", ok), Check("cuda d", ok, "cuda")]
    ctx = Context(stream=io.StringIO(), unavailable={"cuda": "no GPU"})
    results = run_checks(checks, ctx)
    assert [r.status for r in results] == ["pass", "skip", "skip", "skip", "pass", "skip"]  # each one recorded
    rows = [line for line in ctx.stream.getvalue().splitlines() if line.startswith(("pass", "skip"))]
    assert len(rows) == 4, rows  # the three cuda skips in a row are one line; the last one alone
    assert "3 cuda checks" in rows[1] and "no GPU" in rows[1] and "cuda d" in rows[3]
    md = rep.as_markdown(_report_of(results))
    grouped = [line for line in md.splitlines() if line.startswith("| skip")]
    assert len(grouped) == 2 and "cuda a, cuda b, cuda c" in grouped[0] and "no GPU" in grouped[0], grouped


def test_the_report_says_what_a_tolerance_is_and_formats_the_build():
    """Passing rows said `worst error 1.00 of tolerance`, never explained; the build row was a raw dict."""
    from l2fast.selftest import report as rep
    from l2fast.selftest.runner import Result

    build = {"torch_version": "2.14.1+cu130", "cuda": True, "cuda_version": "13.0", "cuda_arch_list": "9.0+PTX",
             "cpu_capability": "AVX2"}
    md = rep.as_markdown(_report_of([Result("cpu float16 accumulate", "pass", "worst error 1.00 of tolerance", 1.0)],
                                    versions={"torch": "2.14.1+cu130", "build": build}))
    assert "{'" not in md and "'cuda'" not in md
    assert "| build | for torch 2.14.1+cu130; CPU kernels: AVX2; CUDA 13.0 kernels for 9.0+PTX |" in md, md
    reading = md.split("## How to read this", 1)[1].split("##", 1)[0]
    for needle in ("float64 reference", "half an ulp", "1.00 or less passes", "float16 and bfloat16"):
        assert needle in reading, needle
    stream = io.StringIO()
    run_checks([], Context(stream=stream))
    assert "tolerance" in stream.getvalue().splitlines()[0]  # the console table says it too, above its header
