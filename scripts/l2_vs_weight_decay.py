"""Coupled L2 (l2fast's penalty in the loss) vs AdamW's decoupled weight_decay, measured.

Trains the seed recipe on the bundled sample for each (l2 weight, weight decay) pair and prints a
markdown table of test accuracy, test loss and sum(p^2) at the end. Run from the repo root:

    python scripts/l2_vs_weight_decay.py [--epochs 5] [--dataset sample]
"""
import argparse
import contextlib
import io
import tempfile

from l2fast.train import DEFAULT_L2_WEIGHT, SEED_L2_WEIGHT, TrainConfig, train

GRID = [(0.0, 0.0), (1e-4, 0.0), (1e-2, 0.0), (1.0, 0.0), (0.0, 0.01), (0.0, 1.0), (0.0, 100.0),
        (DEFAULT_L2_WEIGHT, None), (SEED_L2_WEIGHT, None)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--dataset", default="sample")
    args = parser.parse_args()
    print(f"| --l2-weight (coupled) | --weight-decay (decoupled) | test accuracy | test loss | Σ‖p‖² after {args.epochs} epochs |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (l2, wd) in enumerate(GRID):
            config = TrainConfig(dataset=args.dataset, epochs=args.epochs, device="cpu", no_progress=True,
                                 out=f"{tmp}/run{i}", l2_weight=l2, weight_decay=wd)
            with contextlib.redirect_stdout(io.StringIO()):
                s = train(config)
            wd_text = f"{s['weight_decay']:g}" + (" (AdamW default)" if wd is None else "")
            print(f"| {l2:g} | {wd_text} | {100 * s['test_accuracy']:.2f}% | {s['test_loss']:.4f} | "
                  f"{s['param_sq_norm']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
