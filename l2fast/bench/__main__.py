"""`python -m l2fast.bench WHICH [options]`: each benchmark lives in its own module."""
import importlib
import sys

BENCHMARKS = {
    "penalty": "fused L2 penalty + gradient vs the seed's torch.cat, _foreach ops and torch.compile",
    "train": "the notebook's training loop vs l2fast's training step, ms per step",
    "infer": "onnxruntime vs eager PyTorch vs TorchScript inference latency and throughput",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        lines = "\n".join(f"  {name:8s} {what}" for name, what in BENCHMARKS.items())
        print(f"usage: python -m l2fast.bench {{{','.join(BENCHMARKS)}}} [options]\n{lines}", file=sys.stderr)
        if argv[:1] in (["-h"], ["--help"]):
            return 0
        what = f"unknown benchmark {argv[0]!r}" if argv else "no benchmark named"
        print(f"error: {what}; expected one of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"l2fast.bench.{argv[0]}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
