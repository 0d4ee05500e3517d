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

Nothing is published before it is verified: on the test images of the checkpoint's dataset, eager
PyTorch, the saved TorchScript file, the saved torch.export program and onnxruntime on the saved
ONNX file must agree to <= PARITY_ATOL max absolute logit difference and on every argmax (so
onnxruntime's accuracy equals eager accuracy). All artifacts are written into a temporary folder
that replaces the output folder only when every check passed.

Exit codes: 0 success, 1 export or verification failed, 2 user error (missing or foreign
checkpoint, unknown dataset, bad option).
"""
import argparse
import copy
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ._cli import CLIError, run
from ._io import atomic_dir
from .infer import sha256_file

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
IMAGE_SHAPE = (1, 28, 28)
N_CLASSES = 10
PARITY_ATOL = 1e-4
DEFAULT_OUT = "export"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
PT2_FILE = "model.pt2"
MANIFEST_FILE = "manifest.json"
ARTIFACTS = (ONNX_FILE, TORCHSCRIPT_FILE, PT2_FILE)
# Files an existing output folder may hold and still be replaced as a whole (README.md is kept).
_REPLACEABLE = set(ARTIFACTS) | {MANIFEST_FILE, "README.md"}
_VERIFY_CHUNK = 1000
MNIST_DIGITS = [str(d) for d in range(10)]

PREPROCESSING = {
    "description": ("A raw image is a 28x28 grayscale uint8 array, 0..255, white digit (255) on a black "
                    "background (0), as in MNIST. Convert to float32, divide by 255 (no mean/std "
                    "normalization) and reshape to [N, 1, 28, 28]."),
    "source": {"dtype": "uint8", "shape": [28, 28], "range": [0, 255], "foreground": "white (high values)",
               "background": "black (0)"},
    "steps": ["x = image.astype(float32) / 255", "x = x.reshape(N, 1, 28, 28)"],
    "scale": 1.0 / 255.0,
    "normalization": None,
    "images_of_other_sizes": ("python -m l2fast.infer converts PNG/JPEG files: grayscale, invert if the "
                              "background is light, fit the digit's bounding box into 20x20 keeping "
                              "aspect and center it by center of mass in 28x28 (MNIST's recipe)"),
}

TORCHSCRIPT_STATUS = ("TorchScript (torch.jit) is deprecated in PyTorch 2.x: torch.jit.trace and "
                      "torch.jit.load emit a FutureWarning recommending torch.export. The artifact "
                      "still loads and runs with torch.jit.load (Python or libtorch C++); prefer "
                      "model.pt2 (torch.export) or model.onnx for new deployments.")


class CheckpointError(CLIError):
    """The checkpoint is missing, unreadable, not an l2fast checkpoint or of another architecture."""


class ExportError(Exception):
    """An exporter could not produce a valid artifact (exit 1)."""


class VerificationError(Exception):
    """The artifacts disagree with eager PyTorch beyond tolerance (exit 1); nothing is published."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------
# checkpoint
# --------------------------------------------------------------------------------------------

def resolve_checkpoint(path):
    """A run folder (holding model.pt) or a checkpoint file -> the checkpoint file's path."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no model.pt in this folder (expected a run folder written by "
                                  "python -m l2fast.train, or a checkpoint file)")
        return candidate
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (expected a run folder or its model.pt)")
    return path


def load_checkpoint(path):
    """(MLP in eval mode, checkpoint dict, checkpoint path) from a run folder or checkpoint file.

    Raises CheckpointError with a one-line message for anything that is not a loadable l2fast
    checkpoint of an MLP taking 28x28 images to 10 classes.
    """
    import torch

    from .model import MLP

    path = resolve_checkpoint(path)
    expected = ("expected an l2fast checkpoint: a dict with state_dict and model_config, as written by "
                "python -m l2fast.train")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip archive (or legacy pickle)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file (torch.save writes a zip archive; this file "
                              f"starts with {head!r}); {expected}")
    try:
        # TorchVersion is a str subclass that a checkpoint's "versions" may hold; nothing else is allowed.
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip, weights_only refusals: all mean "not ours"
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True "
                              f"({_load_error_reason(e)}); {expected}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) \
            or not isinstance(ckpt.get("model_config"), dict):
        what = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict with keys {sorted(map(str, ckpt))[:8]}"
        raise CheckpointError(f"{path}: not an l2fast checkpoint (found {what}); {expected}")
    config = ckpt["model_config"]
    sizes = config.get("layer_sizes")
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise CheckpointError(f"{path}: model_config {config!r} has no valid layer_sizes; {expected}")
    want_in = int(np.prod(IMAGE_SHAPE))
    if sizes[0] != want_in or sizes[-1] != N_CLASSES:
        raise CheckpointError(f"{path}: a different architecture (layer_sizes {list(sizes)}); the export contract "
                              f"needs an MLP from {want_in} inputs (1x28x28) to {N_CLASSES} logits")
    try:
        model = MLP(**config)
    except TypeError as e:
        raise CheckpointError(f"{path}: model_config {config!r} does not build an l2fast MLP ({e})") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path}: its weights do not fit MLP(layer_sizes={list(sizes)}), a different "
                              f"architecture ({detail[:240]})") from None
    return model.eval(), ckpt, path


def _load_error_reason(e):
    """The informative part of a torch.load error, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s+Please use|\n\n|$)", text, re.S)
    reason = m.group(1) if m else (text.strip().splitlines() or [""])[0]
    reason = " ".join(reason.split())
    return (reason or type(e).__name__)[:200]


def plain_model(model):
    """A deep copy of the MLP as a `torch.nn.Sequential` of stock torch.nn layers: no l2fast class."""
    from torch import nn

    layers = model.layers if hasattr(model, "layers") else model
    seq = copy.deepcopy(layers).eval()
    for m in seq.modules():
        if not type(m).__module__.startswith("torch.nn"):
            raise ExportError(f"layer {type(m).__qualname__} from {type(m).__module__} is not a stock torch.nn layer")
    assert isinstance(seq, nn.Sequential)
    for p in seq.parameters():
        p.requires_grad_(False)
    return seq


def example_input(batch=2):
    """A deterministic example batch; batch 2 so neither exporter specializes the batch size to 1."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.rand((batch, *IMAGE_SHAPE), generator=g)


def to_model_input(images):
    """uint8 [N,28,28] 0..255 (or float in [0,1]) -> float32 [N,1,28,28] in [0,1]: the documented preprocessing."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / np.float32(255.0)
    else:
        x = images.astype(np.float32)
    return np.ascontiguousarray(x.reshape(len(x), *IMAGE_SHAPE))


# --------------------------------------------------------------------------------------------
# exporters
# --------------------------------------------------------------------------------------------

def _catch_jit_deprecation(notes):
    """Context manager: swallow only torch.jit's own deprecation FutureWarning, note its text, re-emit the rest."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            msg = str(w.message)
            if issubclass(w.category, FutureWarning) and "torch.jit" in msg and "deprecated" in msg:
                if msg not in notes:
                    notes.append(msg)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    return ctx()


def export_torchscript(model, path, notes=None):
    """torch.jit.trace of the plain Sequential, saved to `path`."""
    import torch

    notes = [] if notes is None else notes
    seq = plain_model(model)
    with torch.no_grad(), _catch_jit_deprecation(notes):
        traced = torch.jit.trace(seq, example_input(), check_trace=True)
        torch.jit.save(traced, str(path))
    return notes


def load_torchscript(path, notes=None):
    import torch

    with _catch_jit_deprecation([] if notes is None else notes):
        return torch.jit.load(str(path), map_location="cpu").eval()


def export_pt2(model, path):
    """torch.export with a dynamic batch dimension, saved with torch.export.save."""
    import torch

    seq = plain_model(model)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(seq, (example_input(),), dynamic_shapes=({0: batch},), strict=False)
    torch.export.save(program, str(path))
    return program


def _onnx_dynamo(seq, path, opset):
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.onnx.export(seq, (example_input(),), dynamo=True, verbose=False, opset_version=opset,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: batch},), external_data=False, optimize=True)
    got = {o.domain: o.version for o in program.model_proto.opset_import}.get("", None)
    if got != opset:  # the dynamo exporter keeps its own opset when version conversion fails
        raise ExportError(f"the dynamo exporter produced opset {got}, not the requested {opset}")
    program.save(str(path), external_data=False)


def _onnx_legacy(seq, path, opset):
    import torch

    with warnings.catch_warnings():
        # The legacy exporter announces its own deprecation; we only use it as a recorded fallback.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(seq, (example_input(),), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True, external_data=False)


def export_onnx(model, path, opset=OPSET):
    """Export to one self-contained ONNX file; returns a dict saying which exporter ran and why.

    torch.onnx.export(dynamo=True) first; the legacy TorchScript-based exporter only if that raises
    (e.g. an opset the dynamo exporter cannot convert down to), with the reason recorded.
    """
    path = Path(path)
    seq = plain_model(model)
    info = {"exporter": "torch.onnx.export(dynamo=True)", "fallback_reason": None}
    try:
        _onnx_dynamo(seq, path, opset)
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink()
        try:
            _onnx_legacy(seq, path, opset)
        except Exception as e2:
            reason2 = " ".join(f"{type(e2).__name__}: {e2}".split())[:400]
            raise ExportError(f"ONNX export failed with both exporters at opset {opset}: dynamo: {reason}; "
                              f"legacy: {reason2}") from None
        info = {"exporter": "torch.onnx.export(dynamo=False) (legacy TorchScript-based exporter)",
                "fallback_reason": f"dynamo exporter failed: {reason}"}
    check_onnx(path, opset)
    return info


def check_onnx(path, opset=OPSET):
    """onnx.checker full check, self-containment, pinned opset and the I/O contract; raises ExportError."""
    import onnx

    path = Path(path)
    extra = [p.name for p in path.parent.iterdir()
             if p != path and (p.name.startswith(path.name) or p.suffix == ".data")]
    if extra:
        raise ExportError(f"{path.name}: the exporter wrote external data files {extra}; expected one self-contained file")
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"{path.name}: initializer {init.name!r} refers to external data")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name}: onnx.checker rejects it: {' '.join(str(e).split())[:300]}") from None
    got = {o.domain: o.version for o in model.opset_import}.get("", None)
    if got != opset:
        raise ExportError(f"{path.name}: opset {got}, expected {opset}")
    ins, outs = list(model.graph.input), list(model.graph.output)
    if [i.name for i in ins] != [INPUT_NAME] or [o.name for o in outs] != [OUTPUT_NAME]:
        raise ExportError(f"{path.name}: inputs {[i.name for i in ins]} / outputs {[o.name for o in outs]}, "
                          f"expected [{INPUT_NAME!r}] / [{OUTPUT_NAME!r}]")

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    din, dout = dims(ins[0]), dims(outs[0])
    if len(din) != 4 or not isinstance(din[0], str) or din[1:] != list(IMAGE_SHAPE):
        raise ExportError(f"{path.name}: input shape {din}, expected [batch, 1, 28, 28] with a dynamic batch")
    if len(dout) != 2 or not isinstance(dout[0], str) or dout[1] != N_CLASSES:
        raise ExportError(f"{path.name}: output shape {dout}, expected [batch, {N_CLASSES}] with a dynamic batch")
    for v in (ins[0], outs[0]):
        if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"{path.name}: {v.name} is not float32")
    return model


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------

def _batches(x, chunk):
    # The first batch is a single image: batch 1 is what a latency-bound caller sends.
    yield x[:1]
    for i in range(1, len(x), chunk):
        yield x[i:i + chunk]


def backend_logits(model, folder, x, chunk=_VERIFY_CHUNK, jit_notes=None):
    """Logits of every backend on float32 [N,1,28,28] x, reading the artifacts back from `folder`."""
    import onnxruntime as ort
    import torch

    folder = Path(folder)
    ts = load_torchscript(folder / TORCHSCRIPT_FILE, jit_notes)
    pt2 = torch.export.load(str(folder / PT2_FILE)).module()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / ONNX_FILE), so, providers=["CPUExecutionProvider"])
    runners = {
        "eager": lambda t, a: model(t),
        "torchscript": lambda t, a: ts(t),
        "torch.export": lambda t, a: pt2(t),
        "onnxruntime": lambda t, a: sess.run([OUTPUT_NAME], {INPUT_NAME: a})[0],
    }
    out = {name: [] for name in runners}
    with torch.inference_mode():
        for a in _batches(x, chunk):
            a = np.ascontiguousarray(a)
            t = torch.from_numpy(a)
            for name, fn in runners.items():
                y = fn(t, a)
                y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
                if y.shape != (len(a), N_CLASSES):
                    raise VerificationError(f"{name}: output shape {y.shape} for a batch of {len(a)}, "
                                            f"expected ({len(a)}, {N_CLASSES})")
                out[name].append(y.astype(np.float32, copy=False))
    return {name: np.concatenate(v) for name, v in out.items()}


def compare(logits, labels=None, atol=PARITY_ATOL):
    """Parity report of every backend against eager; report["passed"] and report["failures"]."""
    eager = logits["eager"]
    eager_pred = eager.argmax(1)
    report = {"images": int(len(eager)), "tolerance_max_abs_logit_diff": atol, "backends": {}, "failures": []}
    if labels is not None:
        labels = np.asarray(labels)
        report["eager_accuracy"] = float((eager_pred == labels).mean())
    for name, y in logits.items():
        if name == "eager":
            continue
        diff = float(np.abs(y - eager).max()) if len(y) else 0.0
        pred = y.argmax(1)
        mismatch = int((pred != eager_pred).sum())
        entry = {"max_abs_logit_diff": diff, "argmax_mismatches": mismatch}
        if labels is not None:
            entry["accuracy"] = float((pred == labels).mean())
        report["backends"][name] = entry
        if not np.isfinite(diff) or diff > atol:
            report["failures"].append(f"{name}: max |logit - eager| = {diff:.3g} > {atol:g}")
        if mismatch:
            report["failures"].append(f"{name}: argmax differs from eager on {mismatch} of {len(y)} images")
        if labels is not None and entry["accuracy"] != report["eager_accuracy"]:
            report["failures"].append(f"{name}: accuracy {entry['accuracy']:.4%} != eager {report['eager_accuracy']:.4%}")
    report["passed"] = not report["failures"]
    return report


def verify(model, folder, images, labels=None, atol=PARITY_ATOL, jit_notes=None):
    """Run every backend on `images` (uint8 [N,28,28] or float [N,1,28,28]); raise VerificationError on any failure."""
    x = to_model_input(images)
    if len(x) == 0:
        raise VerificationError("no images to verify on")
    report = compare(backend_logits(model, folder, x, jit_notes=jit_notes), labels, atol)
    if not report["passed"]:
        raise VerificationError("; ".join(report["failures"]), report)
    return report


# --------------------------------------------------------------------------------------------
# the whole export
# --------------------------------------------------------------------------------------------

def versions():
    import onnx
    import onnxruntime

    from .train import versions as training_versions

    v = {**training_versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript

        v["onnxscript"] = onnxscript.__version__
    except Exception:
        v["onnxscript"] = None
    return v


def _check_out_dir(out):
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"--out {out}: exists and is not a folder")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _REPLACEABLE)
        if foreign:
            raise CLIError(f"--out {out}: holds files export did not write ({', '.join(foreign[:5])}); "
                           "it would replace the whole folder: choose a new or empty folder")
    return out


def export_model(model, out_dir, images, labels=None, classes=None, opset=OPSET, dataset_info=None,
                 checkpoint_info=None, log=None):
    """Export `model` (an l2fast MLP or plain Sequential) into `out_dir`, verified; returns the manifest.

    `images` (uint8 [N,28,28] in 0..255, or float32 [N,1,28,28] in [0,1]) are the verification set;
    `labels` (optional int [N]) enable the accuracy check. Everything is written into a temporary
    folder beside `out_dir` that replaces it only if all checks pass (README.md in it is kept); on
    any failure nothing under `out_dir` changes. Raises ExportError or VerificationError.
    """
    log = log or (lambda msg: None)
    out = _check_out_dir(out_dir)
    model = model.eval()
    classes = list(classes) if classes is not None else list(MNIST_DIGITS)
    if len(classes) != N_CLASSES:
        raise CLIError(f"{len(classes)} class labels given, the model has {N_CLASSES} outputs")
    t0 = time.perf_counter()
    with atomic_dir(out, replace=True) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the published folder gets the usual mode
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
        manifest = {
            "format_version": 1,
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
            entry["sha256"] = sha256_file(tmp / name)
            entry["bytes"] = (tmp / name).stat().st_size
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        readme = out / "README.md"
        if readme.is_file():
            (tmp / "README.md").write_bytes(readme.read_bytes())
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    return manifest


def _load_verification_data(ckpt, dataset, data_dir):
    from .data import load_dataset

    recorded = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), dict) else {}
    name = dataset or recorded.get("name") or "auto"
    data_dir = data_dir or recorded.get("data_dir") or "data"
    data = load_dataset(name, data_dir=data_dir)
    info = {"name": data.name, "source": str(getattr(data, "source", "")), "split": "test",
            "requested": {"name": name, "data_dir": str(data_dir)}}
    return data, info


def _user_errors():
    errors = [CheckpointError]
    try:
        from .data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m l2fast.export",
                                description="Export a trained l2fast MLP to ONNX, TorchScript and torch.export, "
                                            "verified against eager PyTorch on the run's test images.")
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder from python -m l2fast.train (its model.pt) or a checkpoint file")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output folder, replaced as a whole on success (default: ./{DEFAULT_OUT})")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset to pin (default {OPSET})")
    p.add_argument("--dataset", default=None,
                   help="verification dataset name (mnist, fashion-mnist, sample, auto); default: the checkpoint's")
    p.add_argument("--data-dir", default=None, help="dataset folder; default: the checkpoint's")
    p.add_argument("--limit", type=int, default=None,
                   help="verify on the first N test images only (default: all of them)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result line")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    import onnx

    if not 7 <= args.opset <= onnx.defs.onnx_opset_version():
        raise CLIError(f"--opset {args.opset}: expected 7..{onnx.defs.onnx_opset_version()} (default {OPSET})")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit {args.limit}: expected a positive number of images")
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    out = _check_out_dir(args.out)
    model, ckpt, ckpt_path = load_checkpoint(args.checkpoint)
    data, dataset_info = _load_verification_data(ckpt, args.dataset, args.data_dir)
    images, labels = data.test_images, data.test_labels
    if args.limit is not None:
        images, labels = images[:args.limit], labels[:args.limit]
    checkpoint_info = {"path": str(ckpt_path), "sha256": sha256_file(ckpt_path),
                       "model_config": ckpt.get("model_config"), "train_config": ckpt.get("train_config"),
                       "dataset": ckpt.get("dataset")}
    log(f"checkpoint {ckpt_path}: MLP {model.config()['layer_sizes']}; verifying on {data.name} test set")
    try:
        manifest = export_model(model, out, images, labels, classes=list(data.classes), opset=args.opset,
                                dataset_info=dataset_info, checkpoint_info=checkpoint_info, log=log)
    except VerificationError as e:
        print(f"error: verification failed, nothing was written to {out}: {e}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"error: export failed, nothing was written to {out}: {e}", file=sys.stderr)
        return 1
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
    return run(main, argv, user_errors=_user_errors())


if __name__ == "__main__":
    sys.exit(cli())
