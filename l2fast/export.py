"""`python -m l2fast.export RUN_DIR_OR_CHECKPOINT`: ONNX, TorchScript and torch.export artifacts, verified.

What lands in the output folder (default `export/` in the current directory):

  model.onnx             one self-contained ONNX file (opset OPSET, no external `.onnx.data`): input
                         "image" float32 [batch, 1, 28, 28] in [0, 1], output "logits" float32
                         [batch, 10]; served by `python -m l2fast.infer` with onnxruntime alone.
  model.torchscript.pt   `torch.jit.trace` of a plain `torch.nn.Sequential` (no l2fast class in it):
                         `torch.jit.load` works without l2fast installed. TorchScript is deprecated
                         in PyTorch 2.x (trace/load emit a FutureWarning) but still works; it is kept
                         for C++ (libtorch) users and older deployments.
  model.pt2              `torch.export` program with a dynamic batch dimension (`torch.export.Dim`),
                         saved with `torch.export.save`; `torch.export.load(path).module()` runs it.
  manifest.json          input/output contract, the preprocessing, class labels, opset, versions,
                         the sha256 of each artifact and the parity results.

Nothing is published before it is verified (l2fast.verify) and nothing the user has is replaced
(l2fast.publish): the artifacts are written into a staging folder and moved into the output folder,
over their own earlier versions only, when every check passed.

Exit codes: 0 success, 1 export or verification failed, 2 user error (missing or foreign
checkpoint, unknown dataset, bad option, an output folder holding something export did not write),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM); the last three leave the output folder as it was.
"""
import sys
import time

from . import _cli
from .contract import (ARTIFACTS, IMAGE_SHAPE, INPUT_NAME, MANIFEST_FILE, MANIFEST_FORMAT, MNIST_LABELS, N_CLASSES, ONNX_FILE,
                       OUTPUT_NAME, PREPROCESSING, PT2_FILE, TORCHSCRIPT_FILE, sha256_file, write_manifest)
from .errors import ExportError, UsageError, VerificationError
from .exporters import (MIN_OPSET, OPSET, TORCHSCRIPT_STATUS, export_onnx, export_pt2, export_torchscript,
                        import_backends, max_opset)
from .publish import check_out, staged
from .verify import PARITY_ATOL, verify

DEFAULT_OUT = "export"


def versions():
    """checkpoint.versions() plus the ONNX stack's."""
    import onnx
    import onnxruntime

    from . import checkpoint

    v = {**checkpoint.versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript

        v["onnxscript"] = onnxscript.__version__
    except ImportError:
        v["onnxscript"] = None
    return v


def check_opset(opset):
    """The opsets that work (found by trying, see exporters.MIN_OPSET); raises UsageError otherwise."""
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise UsageError(f"--opset {opset}: expected {MIN_OPSET}..{top} (default {OPSET}); below {MIN_OPSET} ONNX "
                         f"must list the weights as graph inputs, above {top} the installed onnx knows no opset")
    return opset


def export_model(model, out_dir, images, labels=None, classes=None, opset=OPSET, dataset_info=None,
                 checkpoint_info=None, log=None):
    """Export `model` (an l2fast MLP or plain Sequential) into `out_dir`, verified; returns the manifest.

    `images` (uint8 [N,28,28] in 0..255, or float32 [N,1,28,28] in [0,1]) are the verification set;
    `labels` (optional int [N]) enable the accuracy check. The artifacts and manifest.json replace
    their earlier versions in `out_dir` only if every check passed; nothing else there is touched.
    Raises ExportError or VerificationError (nothing published), OutputError (`out_dir` holds
    something export did not write), UsageError (bad opset or labels).
    """
    log = log or (lambda msg: None)
    classes = list(classes) if classes is not None else list(MNIST_LABELS)
    if len(classes) != N_CLASSES:
        raise UsageError(f"{len(classes)} class labels given, the model has {N_CLASSES} outputs")
    check_opset(opset)
    import_backends()
    model = model.eval()
    t0 = time.perf_counter()
    with staged(out_dir) as tmp:
        try:
            jit_notes = []
            log(f"exporting ONNX (opset {opset})...")
            onnx_info = export_onnx(model, tmp / ONNX_FILE, opset)
            if onnx_info["fallback_reason"]:
                log(f"note: used the legacy ONNX exporter: {onnx_info['fallback_reason']}")
            log("exporting TorchScript...")
            export_torchscript(model, tmp / TORCHSCRIPT_FILE, jit_notes)
            log("exporting torch.export program...")
            export_pt2(model, tmp / PT2_FILE)
            log(f"verifying on {len(images)} images: eager vs TorchScript vs torch.export vs onnxruntime...")
            report = verify(model, tmp, images, labels, jit_notes=jit_notes)
        except VerificationError as e:
            raise VerificationError(f"verification failed, nothing was written to {out_dir}: {e}", e.report) from None
        except ExportError as e:
            raise ExportError(f"export failed, nothing was written to {out_dir}: {e}") from None
        manifest = _manifest(model, tmp, classes, opset, onnx_info, jit_notes, report, dataset_info, checkpoint_info)
        write_manifest(tmp, manifest)
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    return manifest


def _manifest(model, folder, classes, opset, onnx_info, jit_notes, report, dataset_info, checkpoint_info):
    manifest = {
        "format_version": MANIFEST_FORMAT,
        "created_by": "python -m l2fast.export",
        "created_unix": int(time.time()),
        "model": {"architecture": "MLP (Flatten, Linear/ReLU pairs, Linear logits)",
                  "layer_sizes": [int(s) for s in getattr(model, "layer_sizes", ())] or None},
        "checkpoint": checkpoint_info,
        "input": {"name": INPUT_NAME, "shape": ["batch", *IMAGE_SHAPE], "dtype": "float32",
                  "range": [0.0, 1.0], "layout": "NCHW", "dynamic_axes": {"0": "batch"}},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", N_CLASSES], "dtype": "float32",
                   "meaning": "unnormalized class scores (logits); softmax over axis 1 gives probabilities"},
        "preprocessing": PREPROCESSING,
        "classes": classes,
        "opset": opset,
        "onnx_exporter": onnx_info,
        "torchscript_status": TORCHSCRIPT_STATUS,
        "torchscript_warnings": jit_notes,
        "versions": versions(),
        "artifacts": {
            ONNX_FILE: {"format": "ONNX", "load": "onnxruntime.InferenceSession(path)"},
            TORCHSCRIPT_FILE: {"format": "TorchScript (torch.jit.trace)", "load": "torch.jit.load(path)"},
            PT2_FILE: {"format": "torch.export ExportedProgram", "load": "torch.export.load(path).module()"},
        },
        "verification": {"dataset": dataset_info, **report},
    }
    for name, entry in manifest["artifacts"].items():
        entry["sha256"] = sha256_file(folder / name)
        entry["bytes"] = (folder / name).stat().st_size
    return manifest


# ------------------------------------------------------------------------------------------- CLI

def _load_verification_data(ckpt, dataset, data_dir):
    from .data import load_dataset

    recorded = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), dict) else {}
    name = dataset or recorded.get("name") or "auto"
    data_dir = data_dir or recorded.get("data_dir") or "data"
    data = load_dataset(name, data_dir=data_dir)
    info = {"name": data.name, "source": str(getattr(data, "source", "")), "split": "test",
            "requested": {"name": name, "data_dir": str(data_dir)}}
    return data, info


def build_parser():
    p = _cli.ArgumentParser(prog=_cli.prog("l2fast.export", "l2fast-export"),
                                description="Export a trained l2fast MLP to ONNX, TorchScript and torch.export, "
                                            "verified against eager PyTorch on the run's test images.")
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder from python -m l2fast.train (its model.pt) or a checkpoint file")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output folder (default: ./{DEFAULT_OUT}); export replaces only its own files there "
                        "and refuses a folder holding anything else but a README.md")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset to pin, {MIN_OPSET}.. (default {OPSET})")
    p.add_argument("--dataset", default=None,
                   help="verification dataset name (mnist, fashion-mnist, sample, auto); default: the checkpoint's")
    p.add_argument("--data-dir", default=None, help="dataset folder; default: the checkpoint's")
    p.add_argument("--limit", type=int, default=None,
                   help="verify on the first N test images only (default: all of them)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result line")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_opset(args.opset)
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit {args.limit}: expected a positive number of images")
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    out = args.out
    check_out(out)  # before the slow part: a refused folder costs nothing
    with _cli.sigterm_raises():  # SIGTERM unwinds like Ctrl-C: staging folders are removed
        from . import checkpoint  # torch: imported under _cli.run, so a Ctrl-C in it is one line

        ckpt = checkpoint.load(args.checkpoint)
        data, dataset_info = _load_verification_data(ckpt.data, args.dataset, args.data_dir)
        images, labels = data.test_images, data.test_labels
        if args.limit is not None:
            images, labels = images[:args.limit], labels[:args.limit]
        checkpoint_info = {"path": str(ckpt.path), "sha256": sha256_file(ckpt.path),
                           "model_config": ckpt.data.get("model_config"),
                           "train_config": ckpt.data.get("train_config"), "dataset": ckpt.data.get("dataset")}
        log(f"checkpoint {ckpt.path}: MLP {ckpt.model.config()['layer_sizes']}; verifying on {data.name} test set")
        manifest = export_model(ckpt.model, out, images, labels, classes=list(data.classes), opset=args.opset,
                                dataset_info=dataset_info, checkpoint_info=checkpoint_info, log=log)
    ver = manifest["verification"]
    worst = max(b["max_abs_logit_diff"] for b in ver["backends"].values())
    ort_acc = ver["backends"]["onnxruntime"].get("accuracy")
    acc = f", accuracy {ort_acc:.2%} (eager {ver['eager_accuracy']:.2%})" if ort_acc is not None else ""
    print(f"exported {', '.join(ARTIFACTS)} + {MANIFEST_FILE} to {out}/ in {manifest['seconds']}s: "
          f"{ver['images']} {data.name} test images, max |logit diff| {worst:.2e} <= {PARITY_ATOL:g}, "
          f"all argmax equal{acc}")
    return 0


def cli(argv=None):
    """Console entry point (`l2fast-export`): exit 0 ok, 1 export/verification failed, 2 user error."""
    return _cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
