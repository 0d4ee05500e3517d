"""`python -m l2fast.bench infer`: onnxruntime vs eager PyTorch vs TorchScript (and torch.export) on this CPU.

One process, one run, interleaved: every round visits every backend (in a rotated order) for a
batch-1 latency phase (each call timed with perf_counter_ns) and a batch-B throughput phase, so
drift on the machine (turbo, other load) spreads over all of them. Reported: batch-1 p50 and
p99 latency in microseconds and batch-B throughput in images/s, with ratios against eager.

Fairness: every backend gets the same input (float32 [N,1,28,28]) and the same thread count
per phase: `--latency-threads` (default 1: for a 784-64-32-10 MLP a second thread only adds
hand-off cost) and `--throughput-threads` (default: all cores), set with torch.set_num_threads
for eager/TorchScript/torch.export and intra_op_num_threads for onnxruntime (one session per
phase). Torch runs under torch.inference_mode. onnxruntime runs at ORT_ENABLE_ALL with three
call styles: `session.run` with a numpy feed, `run_with_iobinding` with pre-bound OrtValues,
and `run_with_ort_values`; whichever is fastest is what you would deploy, all are shown.

Models: `--model DIR/model.onnx` benchmarks an existing export (the eager model is rebuilt from
the TorchScript file beside it, the torch.export program from model.pt2); `--checkpoint RUN`
exports that checkpoint into a temp folder first; with neither, a freshly initialised MLP
(torch.manual_seed(0)) is exported into a temp folder. Exports go through l2fast.export, so
they are parity-verified before being timed.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .._cli import CLIError, run

LAT_TARGET_US = 50.0


def _rebuild_eager(ts_module):
    """An l2fast MLP with the TorchScript file's weights (keys '1.weight', '3.weight', ... of the Sequential)."""
    import torch

    from ..model import MLP

    sd = {k: v for k, v in ts_module.state_dict().items()}
    weights = [sd[k] for k in sorted((k for k in sd if k.endswith(".weight")), key=lambda k: int(k.split(".")[0]))]
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    model = MLP(layer_sizes=sizes).eval()
    model.layers.load_state_dict(sd, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        x = torch.rand(3, 1, 28, 28)
        if not torch.allclose(model(x), ts_module(x), atol=1e-5):
            raise CLIError("the eager model rebuilt from model.torchscript.pt does not match it")
    return model


def prepare(args, tmp):
    """(export folder, eager model, description) for the options given."""
    import torch

    from .. import export as ex

    if args.model:
        onnx_path = Path(args.model)
        if onnx_path.is_dir():
            onnx_path = onnx_path / ex.ONNX_FILE
        if not onnx_path.is_file():
            raise CLIError(f"{onnx_path}: model file not found (export one with python -m l2fast.export, "
                           "or omit --model to benchmark a freshly initialised MLP)")
        folder = onnx_path.parent
        for name in (ex.TORCHSCRIPT_FILE, ex.PT2_FILE):
            if not (folder / name).is_file():
                raise CLIError(f"{folder / name}: missing; the benchmark needs the whole export folder")
        eager = _rebuild_eager(ex.load_torchscript(folder / ex.TORCHSCRIPT_FILE))
        return folder, onnx_path, eager, f"existing export {onnx_path}"
    if args.checkpoint:
        model, _, path = ex.load_checkpoint(args.checkpoint)
        what = f"checkpoint {path}"
    else:
        torch.manual_seed(0)
        from ..model import MLP

        model = MLP().eval()
        what = "freshly initialised MLP (torch.manual_seed(0))"
    images = np.random.default_rng(0).integers(0, 256, size=(256, 28, 28), dtype=np.uint8)
    folder = Path(tmp) / "export"
    ex.export_model(model, folder, images)
    for p in model.parameters():
        p.requires_grad_(False)
    return folder, folder / ex.ONNX_FILE, model, f"{what}, exported to a temp folder"


def make_backends(folder, onnx_path, eager, lat_threads, thr_threads, batch, include_pt2=True):
    """name -> {phase: (setup(), call())}: each call runs one inference on a pre-made input."""
    import onnxruntime as ort
    import torch

    from .. import export as ex

    ts = ex.load_torchscript(folder / ex.TORCHSCRIPT_FILE)
    pt2 = torch.export.load(str(folder / ex.PT2_FILE)).module() if include_pt2 else None
    rng = np.random.default_rng(1)
    inputs = {1: rng.random((1, 1, 28, 28), dtype=np.float32),
              batch: rng.random((batch, 1, 28, 28), dtype=np.float32)}
    tinputs = {n: torch.from_numpy(a) for n, a in inputs.items()}

    def session(threads):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

    sessions = {1: session(lat_threads), batch: session(thr_threads)}
    in_name = sessions[1].get_inputs()[0].name
    out_name = sessions[1].get_outputs()[0].name
    threads = {1: lat_threads, batch: thr_threads}

    def ort_run(n):
        s, feed, names = sessions[n], {in_name: inputs[n]}, [out_name]
        return lambda: s.run(names, feed)

    def ort_iobinding(n):
        s = sessions[n]
        b = s.io_binding()
        xin = ort.OrtValue.ortvalue_from_numpy(inputs[n])
        yout = ort.OrtValue.ortvalue_from_shape_and_type([n, 10], np.float32)
        b.bind_ortvalue_input(in_name, xin)
        b.bind_ortvalue_output(out_name, yout)
        ro = ort.RunOptions()
        return lambda: s.run_with_iobinding(b, ro)

    def ort_values(n):
        s, names = sessions[n], [out_name]
        feed = {in_name: ort.OrtValue.ortvalue_from_numpy(inputs[n])}
        ro = ort.RunOptions()
        return lambda: s.run_with_ort_values(names, feed, ro)

    def torch_call(module):
        def make(n):
            x = tinputs[n]
            return lambda: module(x)
        return make

    backends = {
        "eager PyTorch": (torch_call(eager), True),
        "TorchScript": (torch_call(ts), True),
        "onnxruntime run": (ort_run, False),
        "onnxruntime iobinding": (ort_iobinding, False),
        "onnxruntime ort_values": (ort_values, False),
    }
    if pt2 is not None:
        backends["torch.export"] = (torch_call(pt2), True)
    calls = {}
    for name, (make, is_torch) in backends.items():
        calls[name] = {n: (make(n), is_torch, threads[n]) for n in (1, batch)}
    return calls


def measure(calls, iters, rounds, batch, reps, warmup=50):
    """Interleaved rounds; returns name -> {"lat_ns": [...], "batch_ns": [...]}."""
    import torch

    names = list(calls)
    samples = {n: {"lat_ns": [], "batch_ns": []} for n in names}
    clock = time.perf_counter_ns
    with torch.inference_mode():
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                for n, key, count in ((1, "lat_ns", iters), (batch, "batch_ns", reps)):
                    fn, is_torch, threads = calls[name][n]
                    torch.set_num_threads(threads)
                    for _ in range(warmup if n == 1 else 3):
                        fn()
                    out = samples[name][key]
                    for _ in range(count):
                        t = clock()
                        fn()
                        out.append(clock() - t)
    return samples


def summarize(samples, batch):
    rows = {}
    for name, s in samples.items():
        lat = np.asarray(s["lat_ns"], dtype=np.float64) / 1e3
        bt = np.asarray(s["batch_ns"], dtype=np.float64) / 1e9
        rows[name] = {"p50_us": float(np.percentile(lat, 50)), "p99_us": float(np.percentile(lat, 99)),
                      "throughput_img_s": float(batch / np.median(bt)), "latency_samples": int(lat.size),
                      "throughput_samples": int(bt.size)}
    base = rows["eager PyTorch"]
    for r in rows.values():
        r["p50_vs_eager"] = base["p50_us"] / r["p50_us"]
        r["throughput_vs_eager"] = r["throughput_img_s"] / base["throughput_img_s"]
    return rows


def format_table(rows, batch):
    lines = [f"| backend | batch-1 p50 (µs) | batch-1 p99 (µs) | p50 speed-up vs eager | batch-{batch} (images/s) "
             f"| throughput vs eager |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['p50_vs_eager']:.2f}x | "
                     f"{r['throughput_img_s']:,.0f} | {r['throughput_vs_eager']:.2f}x |")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m l2fast.bench infer", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="an exported model.onnx (its folder must hold the other artifacts too)")
    src.add_argument("--checkpoint", help="a run folder or checkpoint to export into a temp folder first")
    p.add_argument("--iters", type=int, default=2000, help="batch-1 calls per backend per round (default 2000)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    p.add_argument("--batch", type=int, default=1024, help="throughput batch size (default 1024)")
    p.add_argument("--reps", type=int, default=50, help="batch calls per backend per round (default 50)")
    p.add_argument("--latency-threads", type=int, default=1, help="threads for the batch-1 phase, all backends (default 1)")
    p.add_argument("--throughput-threads", type=int, default=os.cpu_count() or 1,
                   help="threads for the batch phase, all backends (default: all cores)")
    p.add_argument("--no-pt2", action="store_true", help="leave out the torch.export program")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")
    return p


def main(argv=None):
    """Entry point for `python -m l2fast.bench infer`; returns the exit code (2 for user errors)."""
    from ..export import CheckpointError

    return run(_main, argv, user_errors=(CheckpointError,))


def _main(argv):
    args = build_parser().parse_args(argv)
    for opt in ("iters", "rounds", "batch", "reps", "latency_threads", "throughput_threads"):
        if getattr(args, opt) < 1:
            raise CLIError(f"--{opt.replace('_', '-')} {getattr(args, opt)}: expected 1 or more")
    import onnxruntime as ort
    import torch

    from .. import export as ex

    with tempfile.TemporaryDirectory(prefix="l2fast-bench-infer-") as tmp:
        try:
            folder, onnx_path, eager, what = prepare(args, tmp)
        except (ex.ExportError, ex.VerificationError) as e:
            print(f"error: could not export the model to benchmark: {e}", file=sys.stderr)
            return 1
        calls = make_backends(folder, onnx_path, eager, args.latency_threads, args.throughput_threads,
                              args.batch, include_pt2=not args.no_pt2)
        t0 = time.perf_counter()
        samples = measure(calls, args.iters, args.rounds, args.batch, args.reps)
        seconds = time.perf_counter() - t0
    rows = summarize(samples, args.batch)
    # The targets are judged on plain session.run: what l2fast.infer's Predictor does.
    ort_lat = (rows["onnxruntime run"]["p50_us"], "onnxruntime run")
    ort_thr = (rows["onnxruntime run"]["throughput_img_s"], "onnxruntime run")
    eager_thr = rows["eager PyTorch"]["throughput_img_s"]
    load = ", load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    header = (f"model: {what}\n"
              f"machine: {os.cpu_count()} CPU cores{load}; torch {torch.__version__}, onnxruntime {ort.__version__}; "
              f"threads: batch-1 {args.latency_threads}, batch-{args.batch} {args.throughput_threads}; "
              f"{args.rounds} interleaved rounds x {args.iters} batch-1 calls and {args.reps} batch calls per backend "
              f"({seconds:.1f} s)")
    verdicts = [
        f"target onnxruntime batch-1 p50 <= {LAT_TARGET_US:g} µs: {ort_lat[0]:.1f} µs ({ort_lat[1]}): "
        f"{'met' if ort_lat[0] <= LAT_TARGET_US else 'NOT met'}",
        f"target onnxruntime throughput >= eager PyTorch: {ort_thr[0]:,.0f} vs {eager_thr:,.0f} images/s "
        f"({ort_thr[1]}): {'met' if ort_thr[0] >= eager_thr else 'NOT met'}",
    ]
    print(header)
    print(format_table(rows, args.batch))
    print("\n".join(verdicts))
    if args.json:
        doc = {"model": what, "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()), "torch": torch.__version__, "onnxruntime": ort.__version__,
               "latency_threads": args.latency_threads, "throughput_threads": args.throughput_threads,
               "batch": args.batch, "rounds": args.rounds, "iters": args.iters, "reps": args.reps,
               "results": rows, "targets": {"ort_p50_us_max": LAT_TARGET_US, "ort_run_p50_us": ort_lat[0],
                                            "ort_run_throughput": ort_thr[0], "eager_throughput": eager_thr}}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
