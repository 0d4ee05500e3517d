"""`python -m l2fast.bench {penalty,train,infer,optim} [options]` (also `l2fast-bench`).

Each benchmark is a module of this package exposing `add_arguments(parser)` and `run(args) -> int`;
this CLI makes them argparse subcommands. Only the chosen benchmark's module is imported (each pulls
in its own heavy dependencies), so one that fails to import does not break the others.
"""
import importlib
import sys

from .. import _cli

BENCHMARKS = {
    "penalty": "fused L2 penalty + gradient vs the seed's torch.cat, _foreach ops and torch.compile",
    "train": "the notebook's training loop vs l2fast's training step, ms per step",
    "infer": "onnxruntime vs eager PyTorch vs TorchScript inference latency and throughput",
    "optim": "one AdamW step with the L2 penalty: l2fast.optim.AdamW vs torch's fused AdamW, L2Penalty + it, the seed's",
}


def _chosen(argv):
    """The benchmark named in argv (its first non-option word), if it is one of ours."""
    words = [a for a in argv if not a.startswith("-")]
    return words[0] if words and words[0] in BENCHMARKS else None


def build_parser(chosen=None):
    """The bench CLI; only `chosen`'s module is imported to add its options."""
    prog = _cli.prog("l2fast.bench", "l2fast-bench")
    parser = _cli.ArgumentParser(prog=prog, description=(
        "Measure l2fast against its baselines, side by side in one process and in interleaved rounds, "
        f"and print the table. `{prog} BENCHMARK --help` lists a benchmark's options."))
    sub = parser.add_subparsers(dest="benchmark", metavar="{" + ",".join(BENCHMARKS) + "}", required=True)
    for name, what in BENCHMARKS.items():
        p = sub.add_parser(name, help=what, description=what)
        if name == chosen:
            module = importlib.import_module(f"l2fast.bench.{name}")
            if module.__doc__:
                p.description = module.__doc__  # shown as written (_cli.HelpFormatter)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = _chosen(argv)
    args = build_parser(chosen).parse_args(argv)
    return args._run(args)


def cli(argv=None):
    """The `l2fast-bench` console script."""
    return _cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
