"""Parity: the saved artifacts, read back from disk, against eager PyTorch on real images.

Eager PyTorch, the TorchScript file, the torch.export program and onnxruntime on the ONNX file must
agree to <= PARITY_ATOL max absolute logit difference and on every argmax (so onnxruntime's
accuracy equals eager accuracy). `verify` raises VerificationError, with the report, otherwise.
"""
from pathlib import Path

import numpy as np

from .contract import INPUT_NAME, N_CLASSES, ONNX_FILE, OUTPUT_NAME, PT2_FILE, TORCHSCRIPT_FILE, to_model_input
from .errors import VerificationError
from .exporters import load_pt2, load_torchscript, one_line

PARITY_ATOL = 1e-4
_CHUNK = 1000


def _batches(x, chunk):
    # The first batch is a single image: batch 1 is what a latency-bound caller sends.
    yield x[:1]
    for i in range(1, len(x), chunk):
        yield x[i:i + chunk]


def _load_backends(model, folder, jit_notes):
    import onnxruntime as ort

    folder = Path(folder)
    loaders = {
        "torchscript": lambda: load_torchscript(folder / TORCHSCRIPT_FILE, jit_notes),
        "torch.export": lambda: load_pt2(folder / PT2_FILE),
        "onnxruntime": lambda: _ort_session(ort, folder / ONNX_FILE),
    }
    runners = {"eager": lambda t, a: model(t)}
    for name, load in loaders.items():
        try:
            backend = load()
        except Exception as e:  # e.g. an opset this onnxruntime does not implement
            raise VerificationError(f"{name} cannot load the saved artifact: {one_line(e)}") from None
        if name == "onnxruntime":
            runners[name] = lambda t, a, s=backend: s.run([OUTPUT_NAME], {INPUT_NAME: a})[0]
        else:
            runners[name] = lambda t, a, m=backend: m(t)
    return runners


def _ort_session(ort, path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def backend_logits(model, folder, x, chunk=_CHUNK, jit_notes=None):
    """Logits of every backend on float32 [N,1,28,28] x, reading the artifacts back from `folder`."""
    import torch

    runners = _load_backends(model, folder, jit_notes)
    out = {name: [] for name in runners}
    with torch.inference_mode():
        for a in _batches(x, chunk):
            a = np.ascontiguousarray(a)
            t = torch.from_numpy(a)
            for name, fn in runners.items():
                try:
                    y = fn(t, a)
                except Exception as e:
                    raise VerificationError(f"{name} fails on a batch of {len(a)}: {one_line(e)}") from None
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
    x = to_model_input(images, name="verification images")
    if len(x) == 0:
        raise VerificationError("no images to verify on")
    report = compare(backend_logits(model, folder, x, jit_notes=jit_notes), labels, atol)
    if not report["passed"]:
        raise VerificationError("; ".join(report["failures"]), report)
    return report
