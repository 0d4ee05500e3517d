"""Inference: l2fast's Predictor and raw onnxruntime vs eager PyTorch, TorchScript and torch.export.

`python -m l2fast.bench infer`. One process, one run, interleaved: every round visits every
backend (in a rotated order) for a batch-1 latency phase (each call timed with perf_counter_ns)
and a batch-B throughput phase, so drift on the machine (turbo, other load) spreads over all of
them. Reported: batch-1 p50 and p99 latency in microseconds and batch-B throughput in images/s,
with ratios against eager PyTorch.

Two rows start from what a user has, uint8 digits [N,28,28]: "onnxruntime run from uint8 (raw)"
is `InferenceSession.run` with the preprocessing written by hand (astype float32, / 255,
reshape), and "l2fast Predictor from uint8" is `Predictor.predict` (preprocessing, run,
softmax, argmax). Their ratio is the Predictor's cost (goals: batch-1 p50 <= 1.5x raw,
batch-B throughput >= 0.95x raw). The other rows get a ready float32 [N,1,28,28] input: onnxruntime
`session.run`, `run_with_iobinding` with pre-bound OrtValues and `run_with_ort_values`.

Fairness: every backend gets the same thread count per phase: `--latency-threads` (default 1)
and `--throughput-threads` (default: all cores), set with torch.set_num_threads for the torch
backends and intra_op_num_threads for onnxruntime (one session per phase). Torch runs under
torch.inference_mode.

Models: `--model DIR/model.onnx` benchmarks an existing export (the eager model is an l2fast MLP
of the manifest's layer_sizes holding the torch.export program's weights); `--checkpoint RUN`
exports that checkpoint (`l2fast.checkpoint.load`) into a temp folder first; with neither, a
freshly initialised MLP (torch.manual_seed(0)) is. Exports are parity-verified before being timed.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import _cli
from .._io import atomic_write_text
from ..contract import MANIFEST_FILE, ONNX_FILE, PT2_FILE, TORCHSCRIPT_FILE
from ..errors import UsageError

LAT_TARGET_US = 50.0
MAX_BATCH = 65_536  # throughput stops growing long before; the memory does not
# Its uint8 and float32 inputs, the per-call float32 copies, onnxruntime's and torch's buffers; measured:
# 6.7 KB an image (peak RSS at --batch 65536 over --batch 1024, CPU).
BYTES_PER_IMAGE = 7_000
PREDICTOR_P50_MAX = 1.5  # goal: Predictor batch-1 p50 / raw onnxruntime p50
PREDICTOR_THROUGHPUT_MIN = 0.95  # goal: Predictor throughput / raw onnxruntime throughput
RAW = "onnxruntime run from uint8 (raw)"
PREDICTOR = "l2fast Predictor from uint8"


def add_arguments(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="an exported model.onnx (its folder must hold the other artifacts too)")
    src.add_argument("--checkpoint", help="a run folder or checkpoint to export into a temp folder first")
    p.add_argument("--iters", type=int, default=2000, help="batch-1 calls per backend per round (default 2000)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    p.add_argument("--batch", type=int, default=1024, help="throughput batch size, 1..65536 (default 1024)")
    p.add_argument("--reps", type=int, default=50, help="batch calls per backend per round (default 50)")
    p.add_argument("--latency-threads", type=int, default=1, help="threads for the batch-1 phase, all backends (default 1)")
    p.add_argument("--throughput-threads", type=int, default=None,
                   help="threads for the batch phase, all backends (default: every CPU this process may use)")
    p.add_argument("--no-pt2", action="store_true", help="leave out the torch.export program")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-' for stdout)")
    return p


def _eager_from_export(folder, pt2):
    """The eager MLP of an export folder: the manifest's layer_sizes, the weights of `pt2` (its
    torch.export program, loaded)."""
    from ..model import MLP

    try:
        sizes = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))["model"]["layer_sizes"]
        model = MLP(layer_sizes=sizes).eval()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{folder / MANIFEST_FILE}: no model.layer_sizes to rebuild the eager model from ({e}); "
                         "benchmark the checkpoint with --checkpoint instead") from None
    weights = pt2.state_dict()
    # The exporters export either the MLP or its plain Sequential (`model.layers`): the same tensors.
    target = model if any(k.startswith("layers.") for k in weights) else model.layers
    try:
        target.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UsageError(f"{folder / PT2_FILE}: its weights do not fit MLP({sizes}) "
                         f"({' '.join(str(e).split())[:200]})") from None
    return model


def prepare(args, tmp):
    """(export folder, model.onnx path, eager model, description) for the options given; the eager
    model is None for --model (make_backends rebuilds it from the export's model.pt2)."""
    import torch

    from ..model import MLP

    if args.model:
        onnx_path = Path(args.model)
        if onnx_path.is_dir():
            onnx_path = onnx_path / ONNX_FILE
        if not onnx_path.is_file():
            raise UsageError(f"{onnx_path}: model file not found (export one with python -m l2fast.export, "
                             "or omit --model to benchmark a freshly initialised MLP)")
        folder = onnx_path.parent
        for name in (TORCHSCRIPT_FILE, PT2_FILE, MANIFEST_FILE):
            if not (folder / name).is_file():
                raise UsageError(f"{folder / name}: missing; the benchmark needs the whole export folder")
        return folder, onnx_path, None, f"existing export {onnx_path}"
    if args.checkpoint:
        from ..checkpoint import load

        ckpt = load(args.checkpoint)
        model, what = ckpt.model, f"checkpoint {ckpt.path}"
    else:
        torch.manual_seed(0)
        model = MLP().eval()
        what = "freshly initialised MLP (torch.manual_seed(0))"
    from ..export import export_model

    images = np.random.default_rng(0).integers(0, 256, size=(256, 28, 28), dtype=np.uint8)
    folder = Path(tmp) / "export"
    export_model(model, folder, images)
    for p in model.parameters():
        p.requires_grad_(False)
    return folder, folder / ONNX_FILE, model, f"{what}, exported to a temp folder"


def make_backends(folder, onnx_path, eager, lat_threads, thr_threads, batch, include_pt2=True):
    """name -> {n: (call(), threads)} for n in (1, batch): each call runs one inference on a pre-made input.
    eager None: the MLP of the export's model.pt2 weights."""
    import onnxruntime as ort
    import torch

    from ..exporters import load_pt2, load_torchscript
    from ..predictor import Predictor

    ts = load_torchscript(folder / TORCHSCRIPT_FILE)  # torch.jit's deprecation note recorded, not shown
    pt2 = load_pt2(folder / PT2_FILE) if include_pt2 or eager is None else None
    if eager is None:
        eager = _eager_from_export(folder, pt2)
    if not include_pt2:
        pt2 = None
    rng = np.random.default_rng(1)
    u8 = {n: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (1, batch)}
    inputs = {n: (a.astype(np.float32) / np.float32(255)).reshape(n, 1, 28, 28) for n, a in u8.items()}
    tinputs = {n: torch.from_numpy(a) for n, a in inputs.items()}
    threads = {1: lat_threads, batch: thr_threads}

    def session(n):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads[n]
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

    sessions = {n: session(n) for n in (1, batch)}
    predictors = {n: Predictor(onnx_path, threads=threads[n], providers=["CPUExecutionProvider"]) for n in (1, batch)}
    in_name, out_name = sessions[1].get_inputs()[0].name, sessions[1].get_outputs()[0].name
    scale = np.float32(255)

    def ort_run(n):
        s, feed, names = sessions[n], {in_name: inputs[n]}, [out_name]
        return lambda: s.run(names, feed)

    def ort_raw_uint8(n):
        s, images, names = sessions[n], u8[n], [out_name]
        return lambda: s.run(names, {in_name: (images.astype(np.float32) / scale).reshape(n, 1, 28, 28)})

    def predictor(n):
        p, images = predictors[n], u8[n]
        return lambda: p.predict(images)

    def ort_iobinding(n):
        s = sessions[n]
        b = s.io_binding()
        b.bind_ortvalue_input(in_name, ort.OrtValue.ortvalue_from_numpy(inputs[n]))
        b.bind_ortvalue_output(out_name, ort.OrtValue.ortvalue_from_shape_and_type([n, 10], np.float32))
        ro = ort.RunOptions()
        return lambda: s.run_with_iobinding(b, ro)

    def ort_values(n):
        s, names = sessions[n], [out_name]
        feed = {in_name: ort.OrtValue.ortvalue_from_numpy(inputs[n])}
        ro = ort.RunOptions()
        return lambda: s.run_with_ort_values(names, feed, ro)

    def torch_call(module):
        return lambda n: (lambda x=tinputs[n]: module(x))

    backends = {"eager PyTorch": torch_call(eager), "TorchScript": torch_call(ts)}
    if pt2 is not None:
        backends["torch.export"] = torch_call(pt2)
    backends.update({RAW: ort_raw_uint8, PREDICTOR: predictor, "onnxruntime run": ort_run,
                     "onnxruntime iobinding": ort_iobinding, "onnxruntime ort_values": ort_values})
    return {name: {n: (make(n), threads[n]) for n in (1, batch)} for name, make in backends.items()}


def measure(calls, iters, rounds, batch, reps, warmup=50):
    """Interleaved rounds; returns name -> {"lat_ns": [...], "batch_ns": [...]}."""
    import torch

    names = list(calls)
    samples = {n: {"lat_ns": [], "batch_ns": []} for n in names}
    clock = time.perf_counter_ns
    with torch.inference_mode():
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for n, key, count in ((1, "lat_ns", iters), (batch, "batch_ns", reps)):
                    fn, threads = calls[name][n]
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


def verdicts(rows, batch):
    """(lines, targets dict): the Predictor's goals and the onnxruntime targets, each met or not."""
    raw, pred, ort_run, eager = rows[RAW], rows[PREDICTOR], rows["onnxruntime run"], rows["eager PyTorch"]
    p50_ratio = pred["p50_us"] / raw["p50_us"]
    thr_ratio = pred["throughput_img_s"] / raw["throughput_img_s"]
    met = {"predictor_p50": p50_ratio <= PREDICTOR_P50_MAX, "predictor_throughput": thr_ratio >= PREDICTOR_THROUGHPUT_MIN,
           "ort_p50": ort_run["p50_us"] <= LAT_TARGET_US,
           "ort_throughput": ort_run["throughput_img_s"] >= eager["throughput_img_s"]}
    word = {True: "met", False: "NOT met"}
    lines = [
        f"target Predictor batch-1 p50 <= {PREDICTOR_P50_MAX:g}x raw onnxruntime: {pred['p50_us']:.1f} vs "
        f"{raw['p50_us']:.1f} µs = {p50_ratio:.2f}x: {word[met['predictor_p50']]}",
        f"target Predictor batch-{batch} throughput >= {PREDICTOR_THROUGHPUT_MIN:g}x raw onnxruntime: "
        f"{pred['throughput_img_s']:,.0f} vs {raw['throughput_img_s']:,.0f} images/s = {thr_ratio:.2f}x: "
        f"{word[met['predictor_throughput']]}",
        f"target onnxruntime batch-1 p50 <= {LAT_TARGET_US:g} µs: {ort_run['p50_us']:.1f} µs (onnxruntime run): "
        f"{word[met['ort_p50']]}",
        f"target onnxruntime throughput >= eager PyTorch: {ort_run['throughput_img_s']:,.0f} vs "
        f"{eager['throughput_img_s']:,.0f} images/s (onnxruntime run): {word[met['ort_throughput']]}",
    ]
    targets = {"ort_p50_us_max": LAT_TARGET_US, "ort_run_p50_us": ort_run["p50_us"],
               "ort_run_throughput": ort_run["throughput_img_s"], "eager_throughput": eager["throughput_img_s"],
               "predictor_p50_vs_raw": p50_ratio, "predictor_p50_vs_raw_max": PREDICTOR_P50_MAX,
               "predictor_throughput_vs_raw": thr_ratio, "predictor_throughput_vs_raw_min": PREDICTOR_THROUGHPUT_MIN,
               "met": met}
    return lines, targets


def run(args):
    """Run the benchmark for parsed `args`; returns the exit code. Raises l2fast.errors.* on bad input."""
    from ..predictor import max_threads

    if args.throughput_threads is None:
        args.throughput_threads = max_threads()
    for opt in ("iters", "rounds", "batch", "reps", "latency_threads", "throughput_threads"):
        if getattr(args, opt) < 1:
            raise UsageError(f"--{opt.replace('_', '-')} {getattr(args, opt)}: expected 1 or more")
    if args.batch > MAX_BATCH:
        raise UsageError(f"--batch {args.batch}: expected 1..{MAX_BATCH:,} (the benchmark holds about "
                         f"{BYTES_PER_IMAGE:,} bytes an image at once: {MAX_BATCH * BYTES_PER_IMAGE / 1e9:.1f} GB "
                         f"at {MAX_BATCH:,})")
    for opt in ("latency_threads", "throughput_threads"):
        if getattr(args, opt) > max_threads():
            raise UsageError(f"--{opt.replace('_', '-')} {getattr(args, opt)}: expected 1..{max_threads()} "
                             "(the CPUs this process may use)")
    import onnxruntime as ort
    import torch

    with _cli.sigterm_raises(), tempfile.TemporaryDirectory(prefix="l2fast-bench-infer-") as tmp:  # SIGTERM: as Ctrl-C
        folder, onnx_path, eager, what = prepare(args, tmp)
        calls = make_backends(folder, onnx_path, eager, args.latency_threads, args.throughput_threads,
                              args.batch, include_pt2=not args.no_pt2)
        t0 = time.perf_counter()
        samples = measure(calls, args.iters, args.rounds, args.batch, args.reps)
        seconds = time.perf_counter() - t0
    rows = summarize(samples, args.batch)
    lines, targets = verdicts(rows, args.batch)
    load = ", load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"model: {what}\n"
          f"machine: {os.cpu_count()} CPU cores{load}; torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"threads: batch-1 {args.latency_threads}, batch-{args.batch} {args.throughput_threads}; "
          f"{args.rounds} interleaved rounds x {args.iters} batch-1 calls and {args.reps} batch calls per backend "
          f"({seconds:.1f} s)")
    print(format_table(rows, args.batch))
    print("\n".join(lines))
    if args.json:
        doc = {"model": what, "cpu_count": os.cpu_count(),
               "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
               "torch": torch.__version__, "onnxruntime": ort.__version__,
               "latency_threads": args.latency_threads, "throughput_threads": args.throughput_threads,
               "batch": args.batch, "rounds": args.rounds, "iters": args.iters, "reps": args.reps,
               "results": rows, "targets": targets}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            atomic_write_text(args.json, text + "\n")
    return 0


def main(argv=None):
    """`python -m l2fast.bench infer ...` through the current l2fast.bench.__main__; returns the exit code."""
    parser = add_arguments(_cli.ArgumentParser(prog="python -m l2fast.bench infer",
                                                   description=__doc__.split("\n\n")[0]))
    return _cli.run(lambda argv: run(parser.parse_args(argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
