"""The three artifact writers, each with its check: ONNX, TorchScript (torch.jit.trace), torch.export.

Every writer takes an l2fast MLP (or a plain Sequential), exports a deep copy of it as a stock
`torch.nn.Sequential` (no l2fast class in any artifact) and writes one file. Failures raise
ExportError with a one-line reason.
"""
import contextlib
import copy
import logging
import re
import warnings
from pathlib import Path

from .contract import IMAGE_SHAPE, INPUT_NAME, N_CLASSES, OUTPUT_NAME
from .errors import ExportError

OPSET = 18
# Found by trying every opset against this torch/onnx/onnxruntime: below 9 the legacy exporter has
# to list the weights as graph inputs (ONNX IR 3), which breaks the one-input contract; 9..14 work
# through the legacy exporter (the dynamo exporter's version converter cannot go below 15 for
# Shape), 15 up to onnx's newest opset through the dynamo exporter.
MIN_OPSET = 9

TORCHSCRIPT_STATUS = ("TorchScript (torch.jit) is deprecated in PyTorch 2.x: torch.jit.trace and "
                      "torch.jit.load emit a FutureWarning recommending torch.export. The artifact "
                      "still loads and runs with torch.jit.load (Python or libtorch C++); prefer "
                      "model.pt2 (torch.export) or model.onnx for new deployments.")

# Loggers through which torch.onnx and onnxscript's version converter report (with tracebacks) a
# conversion they then work around; export_onnx records them instead of letting them print.
_EXPORTER_LOGGERS = ("torch.onnx", "onnxscript")


def max_opset():
    """The newest ONNX opset the installed onnx knows."""
    import onnx

    return onnx.defs.onnx_opset_version()


def import_backends():
    """Import everything the exporters use, up front.

    torch imports torch._dynamo lazily, inside code that catches exceptions: a Ctrl-C that lands
    in that import leaves a half-initialized torch._dynamo behind, and the next exporter fails
    with "torch._dynamo has no attribute exc". Imported here, a Ctrl-C is a plain
    KeyboardInterrupt and a missing package is an ImportError, before any work starts.
    """
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401
    import torch.export  # noqa: F401
    import torch.onnx  # noqa: F401

    with contextlib.suppress(ImportError):
        import onnxscript  # noqa: F401  (the dynamo ONNX exporter needs it; the legacy one does not)
    return torch


def plain_model(model):
    """A deep copy of the MLP as a `torch.nn.Sequential` of stock torch.nn layers: no l2fast class."""
    from torch import nn

    layers = model.layers if hasattr(model, "layers") else model
    seq = copy.deepcopy(layers).eval()
    if not isinstance(seq, nn.Sequential):
        raise ExportError(f"expected an l2fast MLP or a torch.nn.Sequential, got {type(model).__qualname__}")
    for m in seq.modules():
        if not type(m).__module__.startswith("torch.nn"):
            raise ExportError(f"layer {type(m).__qualname__} from {type(m).__module__} is not a stock torch.nn layer")
    for p in seq.parameters():
        p.requires_grad_(False)
    return seq


def example_input(batch=2):
    """A deterministic example batch; batch 2 so neither exporter specializes the batch size to 1."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.rand((batch, *IMAGE_SHAPE), generator=g)


def one_line(e, limit=400):
    """`Type: message` of an exception on one line, ANSI colours removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(e).__name__}: {e}")
    return " ".join(text.split())[:limit]


# ------------------------------------------------------------------------------------------ ONNX

class _CapturedLogs(logging.Handler):
    """Holds the exporter loggers' records (first line of each, and its exception) instead of printing."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        line = " ".join(record.getMessage().split())
        if record.exc_info and record.exc_info[1] is not None:
            line += f" ({one_line(record.exc_info[1], 300)})"
        self.lines.append(line[:500])


@contextlib.contextmanager
def _capture_exporter_logs():
    capture = _CapturedLogs()
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    loggers += [lg for name, lg in list(logging.Logger.manager.loggerDict.items())
                if isinstance(lg, logging.Logger) and lg.handlers and lg not in loggers
                and any(name.startswith(p + ".") for p in _EXPORTER_LOGGERS)]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [capture]
        lg.propagate = False
    try:
        yield capture.lines
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate


def _onnx_dynamo(seq, path, opset, log_lines):
    import torch

    batch = torch.export.Dim("batch", min=1)  # no upper bound: any batch the memory allows
    program = torch.onnx.export(seq, (example_input(),), dynamo=True, verbose=False, opset_version=opset,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: batch},), external_data=False, optimize=True)
    got = {o.domain: o.version for o in program.model_proto.opset_import}.get("", None)
    if got != opset:  # the dynamo exporter keeps its own opset when version conversion fails
        why = next((line for line in reversed(log_lines) if "Error" in line), None)
        raise ExportError(f"the dynamo exporter produced opset {got}, not the requested {opset}"
                          + (f": {why}" if why else ""))
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


def _not_an_exporter_failure(e):
    """A Ctrl-C or a broken import somewhere in e's chain: not a reason to try the other exporter."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (KeyboardInterrupt, ImportError)):
            return e
        if isinstance(e, AttributeError) and re.search(r"module '(torch|onnx)[\w.]*' has no attribute", str(e)):
            return e
        e = e.__cause__ or e.__context__
    return None


def export_onnx(model, path, opset=OPSET):
    """Export to one self-contained ONNX file; returns a dict saying which exporter ran and why.

    torch.onnx.export(dynamo=True) first; the legacy TorchScript-based exporter only if that
    raises (e.g. an opset the dynamo exporter cannot convert down to), with the reason recorded.
    What the exporters log on the way (version-converter tracebacks) is recorded, not printed.
    """
    path = Path(path)
    seq = plain_model(model)
    info = {"exporter": "torch.onnx.export(dynamo=True)", "fallback_reason": None}
    with _capture_exporter_logs() as log_lines:
        try:
            _onnx_dynamo(seq, path, opset, log_lines)
        except Exception as e:
            broken = _not_an_exporter_failure(e)
            if isinstance(broken, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            if isinstance(broken, ModuleNotFoundError) and broken.name:
                raise ExportError(f"the ONNX exporter could not import what it needs ({one_line(broken)}); "
                                  f"install it (pip install {broken.name.split('.')[0]})") from None
            if broken is not None:
                raise ExportError(f"the ONNX exporter could not import what it needs ({one_line(broken)}); "
                                  "was an import interrupted? Run the export again") from None
            reason = one_line(e)
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
            try:
                _onnx_legacy(seq, path, opset)
            except Exception as e2:
                raise ExportError(f"ONNX export failed with both exporters at opset {opset}: dynamo: {reason}; "
                                  f"legacy: {one_line(e2)}") from None
            info = {"exporter": "torch.onnx.export(dynamo=False) (legacy TorchScript-based exporter)",
                    "fallback_reason": f"dynamo exporter failed: {reason}"}
    info["exporter_log"] = log_lines
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


# ----------------------------------------------------------------------------------- TorchScript

@contextlib.contextmanager
def _catch_jit_deprecation(notes):
    """Swallow only torch.jit's own deprecation FutureWarning (its text goes to `notes`); re-emit the rest."""
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


def export_torchscript(model, path, notes=None):
    """torch.jit.trace of the plain Sequential, saved to `path`; returns the deprecation notes."""
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


# ---------------------------------------------------------------------------------- torch.export

def export_pt2(model, path):
    """torch.export with a dynamic batch dimension (1 and up, no upper bound), saved with torch.export.save."""
    import torch

    seq = plain_model(model)
    batch = torch.export.Dim("batch", min=1)  # no upper bound: any batch the memory allows
    program = torch.export.export(seq, (example_input(),), dynamic_shapes=({0: batch},), strict=False)
    torch.export.save(program, str(path))
    return program


def load_pt2(path):
    import torch

    return torch.export.load(str(path)).module()
