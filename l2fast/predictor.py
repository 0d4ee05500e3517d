"""Predictor: an onnxruntime session on an l2fast ONNX export, torch-free; Prediction: what it returns.

    from l2fast.predictor import Predictor
    p = Predictor("export/model.onnx", threads=1)
    classes, probabilities = p.predict(images)   # uint8 [28,28]/[N,28,28]/[N,1,28,28] or float in [0,1]
    # classes int64 [N], probabilities float32 [N,10]; p.labels maps a class to its label

Everything that does not depend on the images (names, the run options, the label list) is settled
at construction, so a call costs one preprocessing pass, the session run and a softmax.
"""
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._cpu import max_threads
from .contract import IMAGE_SHAPE, labels_from_manifest, read_manifest, to_model_input
from .errors import ModelError, UsageError

_EXPECTED_MODEL = "expected an .onnx file from python -m l2fast.export"


class Prediction(NamedTuple):
    """`classes` int64 [N] (argmax), `probabilities` float32 [N, C] (softmax of the logits)."""

    classes: np.ndarray
    probabilities: np.ndarray

    def top_k(self, k):
        """(classes int64 [N,k], probabilities float32 [N,k]), best first."""
        k = max(1, min(int(k), self.probabilities.shape[1]))
        idx = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return idx.astype(np.int64), np.take_along_axis(self.probabilities, idx, axis=1)


def default_providers():
    """CUDA first when this onnxruntime build offers it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def softmax_argmax(logits):
    """(argmax int64 [N], row-wise softmax float32 [N, C]) of float32 logits [N, C], in place.

    Shaped by measurement (batch 1 and 1024 on a 2-core CPU): numpy's axis-1 max/sum reductions
    over 10 columns cost ~1.5 µs at batch 1 and ~100 µs at 1024, an argmax + gather and a
    matrix-vector product a fraction of that. Shifting by the row maximum only guards exp()
    against overflow, so it is skipped when every row's maximum is within +-80 (exp(88.7) is
    float32's limit); the result is the same softmax. The caller's array is overwritten.
    """
    z = logits
    n = len(z)
    if n == 0:
        return np.zeros(0, np.int64), z
    classes = z.argmax(axis=1)
    if n == 1:
        top = z[0, classes[0]]
        if not -80.0 < top < 80.0:
            z -= top
        np.exp(z, out=z)
        z *= 1.0 / math.fsum(z[0].tolist())
        return classes, z
    top = z.reshape(-1)[classes + np.arange(0, z.size, z.shape[1])][:, None]  # z[i, classes[i]]; ~4x take_along_axis
    if not (-80.0 < top.min() and top.max() < 80.0):
        z -= top
    np.exp(z, out=z)
    z /= np.dot(z, np.ones((z.shape[1], 1), np.float32))
    return classes, z


class Predictor:
    """An onnxruntime session on an l2fast ONNX export; no torch involved.

    path: the .onnx file. threads: intra-op threads, 1..max_threads() (None: onnxruntime's
    default, one per physical core). providers: onnxruntime execution providers (None: CUDA if
    available, else CPU). verify_manifest: check the sha256 against a `manifest.json` beside it.
    Raises ModelError for a model that is missing, not ONNX or not the l2fast contract, and
    UsageError for a bad `threads`.
    """

    def __init__(self, path, threads=None, providers=None, verify_manifest=True):
        import onnxruntime as ort

        self.path = Path(path)
        if threads is not None:
            # onnxruntime starts every thread it is asked for: 100000 of them hang the process.
            if not isinstance(threads, (int, np.integer)) or not 1 <= threads <= max_threads():
                raise UsageError(f"threads={threads}: expected 1..{max_threads()} "
                                 f"(the CPUs this process may use)")
            threads = int(threads)
        self.threads = threads
        if not self.path.is_file():
            what = "is a folder" if self.path.is_dir() else "not found"
            raise ModelError(f"{self.path}: model file {what} ({_EXPECTED_MODEL})")
        self.manifest, self.manifest_note = read_manifest(self.path) if verify_manifest else (None, None)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: no warnings about unused initializers etc.
        if threads is not None:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        providers = list(providers) if providers is not None else default_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # InvalidProtobuf, Fail, InvalidGraph, NoSuchFile...: all "not a usable model"
            reason = " ".join(str(e).split())
            raise ModelError(f"{self.path}: not a valid ONNX model ({reason[:240]}); {_EXPECTED_MODEL}") from None
        self.provider = self.session.get_providers()[0]
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelError(f"{self.path}: {len(inputs)} inputs / {len(outputs)} outputs, expected 1 image input")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        shape = list(inputs[0].shape)
        if len(shape) != 4 or tuple(shape[1:]) != IMAGE_SHAPE or inputs[0].type != "tensor(float)":
            raise ModelError(f"{self.path}: input {self.input_name!r} is {inputs[0].type} {shape}, "
                             f"expected float32 [batch, 1, 28, 28]")
        oshape = list(outputs[0].shape)
        if len(oshape) != 2 or not isinstance(oshape[1], int):
            raise ModelError(f"{self.path}: output {self.output_name!r} has shape {oshape}, expected [batch, classes]")
        self.n_classes = oshape[1]
        self._fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.labels = labels_from_manifest(self.manifest, self.n_classes)
        self._run = self.session.run
        self._outputs = [self.output_name]
        self._run_errors = _onnxruntime_errors()

    def logits(self, images):
        """float32 logits [N, C] for images as `l2fast.contract.to_model_input` accepts them.

        Raises InputError for images that are not a batch of 28x28 digits, ModelError when
        onnxruntime fails to run the model.
        """
        return self.model_logits(to_model_input(images))

    def model_logits(self, x):
        """float32 logits [N, C] for `x`, the model's input as `to_model_input` returns it (float32
        [N, 1, 28, 28] in [0, 1], not checked again). Raises ModelError when onnxruntime fails."""
        if self._fixed_batch is not None and len(x) != self._fixed_batch:
            if self._fixed_batch != 1:
                raise ModelError(f"{self.path}: fixed batch size {self._fixed_batch}, got {len(x)} images")
            return np.concatenate([self.model_logits(x[i:i + 1]) for i in range(len(x))])
        try:
            return self._run(self._outputs, {self.input_name: x})[0]
        except self._run_errors as e:
            reason = " ".join(str(e).split())
            raise ModelError(f"{self.path}: onnxruntime failed to run the model on {len(x)} images "
                             f"({reason[:240]}); {_EXPECTED_MODEL}") from None

    def predict(self, images):
        """Prediction(classes int64 [N], probabilities float32 [N, C]) for one image [28,28] or a batch
        [N,28,28]/[N,1,28,28], uint8 in 0..255 or float in [0, 1]."""
        return Prediction(*softmax_argmax(self.logits(images)))


def _onnxruntime_errors():
    """The exception classes onnxruntime raises from a failed run (all plain Exception subclasses)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented", "InvalidGraph", "EPFail", "EngineError")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
