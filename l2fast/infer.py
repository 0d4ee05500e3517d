"""`python -m l2fast.infer MODEL.onnx INPUT...`: classify digits with onnxruntime alone (no torch).

Inputs, any mix of: image files (PNG, JPEG, TIFF, anything Pillow decodes; any size and bit
depth), `.npy` arrays [N,28,28]/[N,1,28,28]/[28,28] (uint8 0..255 or float 0..1) and IDX image
files (MNIST's format, optionally gzipped). How each becomes 28x28 white-on-black is in
`l2fast.inputs` (`--background auto` decides the polarity from the border by default; `--fit` the
size); arrays and IDX files are streamed through the model `--batch-size` images at a time, so
memory stays bounded whatever their size. Every image becomes float32 [1,28,28] = uint8 / 255
and the model's logits go through a softmax (`l2fast.predictor`).

Output: one line per image on stdout, `NAME: LABEL (p=0.9987)`, with `--top-k K` the K best as
`LABEL (p=...)` separated by ` | `. NAME is the file, or `file[i]` for the i-th image of an array.
`--json` prints JSON Lines instead: one object per image, `{"input", "index", "class", "label",
"probability", "top_k": [{"class", "label", "probability"}...]}` (plus `"warnings"` when the
image's fit looks wrong), and `{"input", "error"}` for an input that could not be read. The
execution provider (CUDA when onnxruntime offers it, else CPU) and warnings go to stderr.

When `manifest.json` (written by `python -m l2fast.export`) sits beside the model, the model file's
sha256 must match the manifest's, and the manifest's class labels are used.

Exit codes: 0 all inputs predicted; 1 one or more inputs could not be read (the others were still
predicted and printed); 2 usage or model error (bad option; missing, truncated or non-ONNX model;
sha256 mismatch with manifest.json; a model onnxruntime fails to run). Errors are one line on
stderr, no traceback.
"""
import json
import sys
import warnings

from . import _cli
from .contract import sha256_file, to_model_input  # noqa: F401  (sha256_file: kept for callers that import it from here)
from .errors import InputError, ModelError, UsageError  # noqa: F401  (re-exported for API users)
from .inputs import BACKGROUNDS, DEFAULT_BATCH, FIT_THRESHOLD, FITS, FitWarning, iter_batches, load_image  # noqa: F401
from .predictor import Prediction, Predictor, max_threads, softmax_argmax  # noqa: F401


def build_parser():
    p = _cli.ArgumentParser(
        prog=_cli.prog("l2fast.infer", "l2fast-infer"),
        description="Classify 28x28 digits with an ONNX model exported by python -m l2fast.export, "
                    "using onnxruntime only (no torch).",
        epilog="Exit codes: 0 all predicted, 1 some inputs failed (others still printed), 2 usage or model error.")
    p.add_argument("model", metavar="MODEL.onnx", help="the exported model (manifest.json beside it is checked)")
    p.add_argument("inputs", metavar="INPUT", nargs="+",
                   help="PNG/JPEG/TIFF images, .npy arrays [N,28,28]/[N,1,28,28] (uint8 or float 0..1), IDX image files")
    p.add_argument("--json", action="store_true", help="JSON Lines on stdout: one object per image (or per failed input)")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="also show the K most likely classes (default 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="onnxruntime intra-op threads, 1..the CPUs available (default: its own)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, metavar="N",
                   help=f"images per onnxruntime call, and per chunk read from an array (default {DEFAULT_BATCH})")
    p.add_argument("--background", choices=BACKGROUNDS, default="auto",
                   help="auto (default): invert an image whose border is light; black: white digit on black like "
                        "MNIST, taken as is; white: dark digit on light, inverted")
    p.add_argument("--invert", action="store_const", const="white", dest="background",
                   help="same as --background white")
    p.add_argument("--fit", choices=FITS, default="auto",
                   help="how image files become 28x28: mnist = bounding box into 20x20, centre of mass at (14, 14), "
                        "as MNIST; stretch = resize whole image; none = must already be 28x28; auto (default) = none "
                        "for a 28x28 image whose digit already sits as MNIST's do (box 16-20 px, centre of mass "
                        "within 1 px of (14, 14)), else mnist")
    p.add_argument("--cpu", action="store_true", help="use the CPU provider even if CUDA is available")
    return p


class _Writer:
    """Collects images from several inputs into batches of `batch_size` and prints their predictions in order."""

    def __init__(self, predictor, batch_size, top_k, as_json, out):
        self.predictor, self.batch_size, self.k, self.as_json, self.out = predictor, batch_size, top_k, as_json, out
        self.images, self.keys = [], []  # the model's input, in chunks; (input, index or None, warnings) per image
        self.count = 0

    def add(self, images, keys):
        """`images`: the model's input, float32 [n,1,28,28] in [0,1], as l2fast.inputs yields it."""
        self.images.append(images)
        self.keys.extend(keys)
        self.count += len(keys)
        if self.count >= self.batch_size:
            self.flush()

    def flush(self):
        if not self.images:
            return
        import numpy as np

        x = self.images[0] if len(self.images) == 1 else np.concatenate(self.images)
        keys = self.keys
        self.images, self.keys, self.count = [], [], 0
        labels = self.predictor.labels
        for i in range(0, len(x), self.batch_size):
            logits = self.predictor.model_logits(x[i:i + self.batch_size])
            top_c, top_p = Prediction(*softmax_argmax(logits)).top_k(self.k)
            lines = []
            for j in range(len(top_c)):
                source, index, notes = keys[i + j]
                if self.as_json:
                    rec = {"input": source, "index": index, "class": int(top_c[j, 0]), "label": labels[top_c[j, 0]],
                           "probability": float(top_p[j, 0]),
                           "top_k": [{"class": int(c), "label": labels[c], "probability": float(p)}
                                     for c, p in zip(top_c[j], top_p[j])]}
                    if notes:
                        rec["warnings"] = notes
                    lines.append(json.dumps(rec))
                else:
                    name = source if index is None else f"{source}[{index}]"
                    lines.append(f"{name}: " + " | ".join(f"{labels[c]} (p={p:.4f})" for c, p in zip(top_c[j], top_p[j])))
            self.out.write("\n".join(lines) + "\n")
        self.out.flush()

    def error(self, source, message):
        self.flush()  # keep the output in input order
        _cli.error(message)
        if self.as_json:
            self.out.write(json.dumps({"input": source, "error": str(message)}) + "\n")
            self.out.flush()


def _answer(writer, path, background, fit, batch_size):
    """Stream one input through the model; raises InputError (after what was read before it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FitWarning)
        for batch in iter_batches(path, background, fit, batch_size):
            notes = [str(w.message) for w in caught if issubclass(w.category, FitWarning)]
            for note in notes:
                print(f"warning: {note}", file=sys.stderr)
            caught.clear()
            if batch.start is None:
                keys = [(str(path), None, notes)]
            else:
                keys = [(str(path), batch.start + i, []) for i in range(len(batch.images))]
            writer.add(batch.images, keys)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.top_k < 1:
        raise UsageError(f"--top-k {args.top_k}: expected 1 or more")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: expected 1 or more")
    predictor = Predictor(args.model, threads=args.threads,
                          providers=["CPUExecutionProvider"] if args.cpu else None)
    threads = f", {args.threads} intra-op threads" if args.threads else ""
    print(f"{predictor.path}: onnxruntime {predictor.provider}{threads}", file=sys.stderr)
    if predictor.manifest_note:
        print(f"note: {predictor.manifest_note}", file=sys.stderr)

    writer = _Writer(predictor, args.batch_size, min(args.top_k, predictor.n_classes), args.json, sys.stdout)
    failed = 0
    for path in args.inputs:
        try:
            _answer(writer, path, args.background, args.fit, args.batch_size)
        except InputError as e:
            failed += 1
            writer.error(str(path), e)
    writer.flush()
    if failed:
        _cli.error(f"{failed} of {len(args.inputs)} inputs could not be read")
        return 1
    return 0


def cli(argv=None):
    """Console entry point (`l2fast-infer`)."""
    return _cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
