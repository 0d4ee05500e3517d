"""GPU measurements of the kernels, the optimizer and training, side by side in one run, with CUDA events: run by
scripts/gpu_check.sh (its step `measure`), or alone:

    python scripts/gpu_measure.py --out DIR [--parts kernel,mlp,train,fsdp]

  kernel  l2_penalty_ (accumulate / fresh grads / value only) on 10^8 float32 and bfloat16 values
          (one tensor, and float32 over 200 tensors) against a device-to-device copy moving the
          same bytes; targets: >= 90% of the copy's bandwidth in float32, >= 85% in bfloat16.
  mlp     the seed MLP's 52,650 values: kernel launches per L2Penalty.add_grad_() (profiler), host
          µs per call (no sync), GPU µs per call over 1,000 calls (events), and the same for
          torch._foreach_norm + torch._foreach_add_; target: one launch, <= 8 µs of host time.
  train   `python -m l2fast.train --cuda-graphs` for 5 epochs on the 60,000 images `bench train`
          uses (the sample's digits tiled, written in torchvision's layout): the time of the 5
          epochs (target <= 0.5 s) and every logged loss against the CPU run's (1e-4).
  fsdp    torchrun --nproc_per_node=1 -m l2fast.train --parallel fsdp --device cuda (NCCL) against a
          one-process CUDA run: the logged losses to 1e-4.

Writes DIR/measure.md (the tables) and DIR/measure.json; prints the tables as it goes.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHT = 1e-4
LOSS_RTOL = 1e-4


def log(text, lines):
    print(text, flush=True)
    lines.append(text)


def event_ms(fn):
    """Milliseconds of one fn() between two CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def side_by_side(fns, reps):
    """{name: median ms}, the methods timed in alternation (rep by rep) so that clocks and
    neighbours affect each alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(event_ms(fn))
    return {name: statistics.median(t) for name, t in times.items()}


# --- kernel bandwidth --------------------------------------------------------------------------------

def kernel_part(lines, results, args):
    from l2fast.bench.penalty import make_params

    ops = torch.ops.l2fast
    n = 100_000_000
    log("\n## l2_penalty_ against a device-to-device copy of the same bytes (10^8 values)\n", lines)
    log("| dtype | tensors | mode | bytes moved | l2fast ms | copy ms | l2fast GB/s | copy GB/s | "
        "bandwidth ratio | target |", lines)
    log("|---|---|---|---|---|---|---|---|---|---|", lines)
    for dtype, tensors in ((torch.float32, 1), (torch.float32, 200), (torch.bfloat16, 1)):
        if tensors == 1:
            params = [torch.randn(n, device="cuda", dtype=dtype)]
        else:
            params = [p.detach().to(dtype) for p in make_params(n, "cuda", tensors)]
        grads = [torch.randn_like(p) for p in params]
        size = params[0].element_size()
        target = 0.90 if dtype == torch.float32 else 0.85
        modes = {  # name: (call, bytes moved per value)
            "accumulate (read p, read g, write g)": (lambda: ops.l2_penalty_(params, grads, WEIGHT, []), 3),
            "fresh grads (read p, write g)": (lambda: ops.l2_penalty_(params, grads, WEIGHT, list(range(tensors))), 2),
            "value only (read p)": (lambda: ops.sq_norm(params), 1),
        }
        for mode, (call, per_value) in modes.items():
            moved = per_value * size * n
            src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            t = side_by_side({"l2fast": call, "copy": lambda: dst.copy_(src)}, args.reps)
            ratio = t["copy"] / t["l2fast"]
            met = "met" if ratio >= target else "MISSED"
            log(f"| {str(dtype).replace('torch.', '')} | {tensors} | {mode} | {moved / 1e9:.2f} GB | "
                f"{t['l2fast']:.3f} | {t['copy']:.3f} | {moved / t['l2fast'] / 1e6:,.0f} | "
                f"{moved / t['copy'] / 1e6:,.0f} | {ratio:.1%} | >= {target:.0%} ({met}) |", lines)
            results.append({"part": "kernel", "dtype": str(dtype), "tensors": tensors, "mode": mode,
                            "bytes": moved, "l2fast_ms": t["l2fast"], "copy_ms": t["copy"], "ratio": ratio,
                            "target": target})
            del src, dst
        del params, grads
        torch.cuda.empty_cache()


# --- the seed MLP's size -----------------------------------------------------------------------------

def host_us_per_call(fn, calls=200, rounds=7):
    """Median host µs per call over rounds of `calls` back-to-back calls, no sync inside a round."""
    per = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(per)


def gpu_us_per_call(fn, calls=1000):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    return event_ms(lambda: [fn() for _ in range(calls)]) / calls * 1e3


def launches_per_call(fn, calls=10):
    from torch.profiler import ProfilerActivity, profile

    from l2fast.selftest.checks_cuda import _device_events

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels, copies, sets = _device_events(prof)
    return len(kernels) / calls, (len(copies) + len(sets)) / calls


def mlp_part(lines, results, args):
    import l2fast
    from l2fast.bench.penalty import foreach_way, make_params

    params = make_params(None, "cuda", 0)
    for p in params:
        p.grad = torch.zeros_like(p)
    plain, grads = [p.detach() for p in params], [p.grad for p in params]
    pen = l2fast.L2Penalty(params, WEIGHT)
    methods = {"L2Penalty.add_grad_": pen.add_grad_,
               "l2fast.l2_penalty_": lambda: l2fast.l2_penalty_(params, WEIGHT),
               "foreach (norm + add_)": lambda: foreach_way(plain, grads, WEIGHT)}
    numel = sum(p.numel() for p in params)
    log(f"\n## The seed MLP ({numel:,} values, {len(params)} tensors)\n", lines)
    log("| method | kernels/call | memcpy+memset/call | host µs/call | GPU µs/call (1,000 calls) |", lines)
    log("|---|---|---|---|---|", lines)
    row = {}
    for name, fn in methods.items():
        kernels, copies = launches_per_call(fn)
        host, gpu = host_us_per_call(fn), gpu_us_per_call(fn)
        row[name] = (host, gpu)
        log(f"| {name} | {kernels:g} | {copies:g} | {host:.2f} | {gpu:.2f} |", lines)
        results.append({"part": "mlp", "method": name, "kernels_per_call": kernels, "copies_per_call": copies,
                        "host_us": host, "gpu_us": gpu})
    host, gpu = row["L2Penalty.add_grad_"]
    fh, fg = row["foreach (norm + add_)"]
    log(f"\nL2Penalty.add_grad_: {host:.2f} µs of host time per call (target <= 8: "
        f"{'met' if host <= 8 else 'MISSED'}); foreach/L2Penalty: host {fh / host:.2f}x, GPU {fg / gpu:.2f}x", lines)


# --- training ----------------------------------------------------------------------------------------

def _python(args, log_path, timeout, env=None):
    with open(log_path, "w") as f:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, env={**os.environ, **(env or {})})
    return done.returncode


def _losses(metrics):
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    return {(r["epoch"], r["step"]): r["loss"] for r in records if "loss" in r}


def _compare(a, b):
    """Worst relative difference of b's losses from a's, over the steps both logged (None if they differ)."""
    if not a or sorted(a) != sorted(b):
        return None
    return max(abs(b[k] - a[k]) / abs(a[k]) for k in a)


def train_part(lines, results, args):
    out = args.out
    from l2fast.bench.train import tiled_train_set
    from l2fast.idx import write_idx

    images, labels, sample = tiled_train_set()
    raw = out / "data" / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", labels.astype("uint8"))
    write_idx(raw / "t10k-images-idx3-ubyte", sample.test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", sample.test_labels.astype("uint8"))
    common = ["-m", "l2fast.train", "--dataset", "mnist", "--data-dir", str(out / "data"), "--no-progress",
              "--log-every", "100"]
    runs = {"cuda --cuda-graphs": ["--device", "cuda", "--cuda-graphs"], "cuda": ["--device", "cuda"],
            "cpu": ["--device", "cpu"]}
    log("\n## 5 epochs of the 60,000-image set (`bench train`'s), batch 64\n", lines)
    log("| run | exit | train seconds (5 epochs) | steps/s | worst loss difference to cpu |", lines)
    log("|---|---|---|---|---|", lines)
    summaries, losses = {}, {}
    for name, flags in runs.items():
        tag = name.replace(" ", "").replace("-", "")
        rc = _python([*common, *flags, "--out", str(out / f"run-{tag}"), "--metrics", str(out / f"{tag}.jsonl")],
                     out / f"train-{tag}.log", timeout=120)
        summaries[name] = json.loads((out / f"run-{tag}" / "summary.json").read_text()) if rc == 0 else {}
        losses[name] = _losses(out / f"{tag}.jsonl") if rc == 0 else {}
        summaries[name]["rc"] = rc
    for name, s in summaries.items():
        worst = _compare(losses["cpu"], losses[name])
        seconds = s.get("train_seconds")
        log(f"| {name} | {s['rc']} | {seconds if seconds is None else f'{seconds:.3f}'} | "
            f"{s.get('steps_per_second', 0):,.0f} | {'n/a' if worst is None else f'{worst:.1e}'} |", lines)
        results.append({"part": "train", "run": name, "rc": s["rc"], "train_seconds": seconds,
                        "worst_rel_loss_diff_to_cpu": worst})
    graphs = summaries["cuda --cuda-graphs"].get("train_seconds")
    worst = _compare(losses["cpu"], losses["cuda --cuda-graphs"])
    log(f"\n--cuda-graphs: 5 epochs in {'(failed)' if graphs is None else f'{graphs:.3f}'} s (target <= 0.5 s: "
        f"{'met' if graphs is not None and graphs <= 0.5 else 'MISSED'}); worst relative loss difference to cpu "
        f"{'(n/a)' if worst is None else f'{worst:.1e}'} (target <= {LOSS_RTOL:g}: "
        f"{'met' if worst is not None and worst <= LOSS_RTOL else 'MISSED'})", lines)


def fsdp_part(lines, results, args):
    out = args.out
    common = ["--dataset", "sample", "--no-progress", "--max-steps", "250", "--log-every", "10"]
    single = _python(["-m", "l2fast.train", "--device", "cuda", *common, "--out", str(out / "run-single"),
                      "--metrics", str(out / "single.jsonl")], out / "train-single.log", timeout=120)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                "l2fast.train", "--parallel", "fsdp", "--device", "cuda", *common, "--out", str(out / "run-fsdp"),
                "--metrics", str(out / "fsdp.jsonl")]
    with open(out / "train-fsdp.log", "w") as f:
        fsdp = subprocess.run(torchrun, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=180).returncode
    worst = _compare(_losses(out / "single.jsonl"), _losses(out / "fsdp.jsonl")) if single == fsdp == 0 else None
    ok = worst is not None and worst <= LOSS_RTOL
    log(f"\n## One-process NCCL: torchrun --nproc_per_node=1 ... --parallel fsdp --device cuda\n\nexit {fsdp} "
        f"(single-process run: exit {single}); worst relative loss difference over 25 logged steps: "
        f"{'(n/a)' if worst is None else f'{worst:.1e}'} (target <= {LOSS_RTOL:g}: {'met' if ok else 'MISSED'})", lines)
    results.append({"part": "fsdp", "rc": fsdp, "single_rc": single, "worst_rel_loss_diff": worst})


PARTS = {"kernel": kernel_part, "mlp": mlp_part, "train": train_part, "fsdp": fsdp_part}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for measure.md, measure.json and the logs")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per kernel measurement")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not torch.cuda.is_available():
        print(f"error: {'unknown part ' + unknown[0] if unknown else 'no CUDA device'}", file=sys.stderr)
        return 2
    import l2fast.ops  # noqa: F401

    args.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    lines = [f"# H200 measurements: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}"]
    print(lines[0], flush=True)
    results = []
    failed = []
    for name in parts:
        t0 = time.perf_counter()
        try:
            PARTS[name](lines, results, args)
        except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others' numbers
            failed.append(name)
            log(f"\n**{name} failed: {type(e).__name__}: {e}**", lines)
        log(f"\n({name}: {time.perf_counter() - t0:.0f} s)", lines)
        (args.out / "measure.md").write_text("\n".join(lines) + "\n")
        (args.out / "measure.json").write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
