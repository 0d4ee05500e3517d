"""The training checkpoint: save, load (weights_only) and validate; the versions recorded in it.

A checkpoint is a dict saved with torch.save:
  state_dict    the MLP's tensors, on CPU
  model_config  {"layer_sizes": [784, ..., 10]}: what l2fast.model.MLP(**model_config) builds
  train_config  the training options, plain JSON-able values
  dataset       {"name": ..., "data_dir": ...}: what the model was trained and tested on
  versions      l2fast, torch, numpy, python
"""
import math
import platform
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from ._io import atomic_path, free_bytes
from .contract import IMAGE_SHAPE, N_CLASSES
from .errors import CheckpointError, OutputError
from .model import MLP

CHECKPOINT_FILE = "model.pt"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the MLP can load and check
_EXPECTED = ("expected an l2fast checkpoint: a dict with state_dict and model_config, as written by "
             "python -m l2fast.train")


class Checkpoint(NamedTuple):
    model: MLP  # in eval mode
    data: dict  # the whole checkpoint dict
    path: Path


def versions():
    import numpy

    from . import __version__

    return {"l2fast": __version__, "torch": str(torch.__version__), "numpy": numpy.__version__,
            "python": platform.python_version()}


def save(path, model, train_config, dataset):
    """Write `model` (an l2fast MLP) as a checkpoint at `path`, atomically; OutputError naming `path`
    when it cannot be written (nothing is left behind then)."""
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.config(),
        "train_config": dict(train_config),
        "dataset": dict(dataset),
        "versions": versions(),
    }
    try:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
    except RuntimeError as e:  # torch.save's writer reports a failed write (a full disk) this way
        reason = " ".join(str(e).split())[:300]
        raise OutputError(f"{path}: cannot write the checkpoint (torch.save: {reason}; "
                          f"{free_bytes(path):,} bytes free there)") from None


def resolve(path):
    """A run folder (holding model.pt) or a checkpoint file -> the checkpoint file's path."""
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_FILE
        if not candidate.is_file():
            raise CheckpointError(f"{path}: no {CHECKPOINT_FILE} in this folder (expected a run folder written by "
                                  "python -m l2fast.train, or a checkpoint file)")
        return candidate
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (expected a run folder or its {CHECKPOINT_FILE})")
    return path


def load(path):
    """Checkpoint(model in eval mode, checkpoint dict, file path) from a run folder or checkpoint file.

    Raises CheckpointError with a one-line message for anything that is not a loadable l2fast
    checkpoint of an MLP taking 28x28 images to 10 classes.
    """
    path = resolve(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip archive (or legacy pickle)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file (torch.save writes a zip archive; this file "
                              f"starts with {head!r}); {_EXPECTED}")
    try:
        # TorchVersion is a str subclass that a checkpoint's "versions" may hold; nothing else is allowed.
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]), warnings.catch_warnings():
            # torch says it validates a sparse tensor's indices (it still does; the tensor is refused below)
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip, weights_only refusals: all mean "not ours"
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True "
                              f"({_load_error_reason(e)}); {_EXPECTED}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) \
            or not isinstance(ckpt.get("model_config"), dict):
        what = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict with keys {sorted(map(str, ckpt))[:8]}"
        raise CheckpointError(f"{path}: not an l2fast checkpoint (found {what}); {_EXPECTED}")
    for key in ("model_config", "train_config", "dataset"):  # export's manifest holds them: strict JSON
        bad = _not_json(ckpt.get(key), key)
        if bad:
            raise CheckpointError(f"{path}: its {bad}; expected plain JSON values (finite numbers, strings, lists, "
                                  f"dicts), as python -m l2fast.train writes them")
    model = _build(path, ckpt["model_config"], ckpt["state_dict"])
    return Checkpoint(model, ckpt, path)


def _not_json(value, where):
    """Where `value` holds what strict JSON cannot (`train_config['lr'] is nan`), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} is {value}"
    if value is None or isinstance(value, (str, int)):
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not (k is None or isinstance(k, (str, int, float))):
                return f"{where} has a {type(k).__name__} key"
            bad = _not_json(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if isinstance(value, (list, tuple)):
        return next((bad for i, v in enumerate(value) if (bad := _not_json(v, f"{where}[{i}]"))), None)
    return f"{where} is a {type(value).__name__}"


def _build(path, config, state_dict):
    """The MLP that `config` describes, loaded with `state_dict`, in eval mode.

    The config is only trusted once the state dict's tensors have exactly the shapes it implies:
    a small file cannot make us allocate the huge model its config claims.
    """
    sizes = config.get("layer_sizes")
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2 or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise CheckpointError(f"{path}: model_config {config!r} has no valid layer_sizes; {_EXPECTED}")
    sizes = [int(s) for s in sizes]
    want_in = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    if sizes[0] != want_in or sizes[-1] != N_CLASSES:
        raise CheckpointError(f"{path}: a different architecture (layer_sizes {sizes}); the export contract "
                              f"needs an MLP from {want_in} inputs (1x28x28) to {N_CLASSES} logits")
    if 2 * (len(sizes) - 1) != len(state_dict):  # a weight and a bias per layer: checked before building
        raise CheckpointError(f"{path}: layer_sizes {sizes[:8]}{'...' if len(sizes) > 8 else ''} needs "
                              f"{2 * (len(sizes) - 1)} tensors, the state dict holds {len(state_dict)}; "
                              "a different architecture or a corrupted model_config")
    try:
        with torch.device("meta"):  # shapes and names only: allocates nothing, whatever the sizes
            expected = {k: tuple(v.shape) for k, v in MLP(**config).state_dict().items()}
    except TypeError as e:
        raise CheckpointError(f"{path}: model_config {config!r} does not build an l2fast MLP ({e})") from None
    except (RuntimeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: layer_sizes {sizes} cannot be built ({' '.join(str(e).split())[:200]}): "
                              "a different architecture or a corrupted model_config") from None
    problems = _shape_problems(expected, state_dict)
    if problems:
        raise CheckpointError(f"{path}: its weights do not fit MLP(layer_sizes={sizes}), a different architecture "
                              f"or a corrupted model_config ({'; '.join(problems[:4])})")
    model = MLP(**config)
    model.load_state_dict(state_dict, strict=True)
    bad = [k for k, v in state_dict.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: weights {', '.join(bad[:4])} hold NaN or inf (a diverged run?); "
                              "there is no working model to export")
    return model.eval()


def _shape_problems(expected, state_dict):
    problems = []
    missing = [k for k in expected if k not in state_dict]
    extra = [str(k) for k in state_dict if k not in expected]
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:4])}")
    for k, shape in expected.items():
        v = state_dict.get(k)
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            problems.append(f"{k} is a {type(v).__name__}, expected a tensor")
        elif v.layout != torch.strided:
            problems.append(f"{k} is a {v.layout} tensor, expected a dense one")
        elif v.device.type != "cpu":  # weights_only loads onto the CPU: only a meta tensor stays off it
            problems.append(f"{k} is on the {v.device.type} device (no values), expected a tensor holding weights")
        elif v.dtype not in _FLOAT_DTYPES:
            problems.append(f"{k} is a {v.dtype} tensor, expected float16, bfloat16, float32 or float64")
        elif tuple(v.shape) != shape:
            problems.append(f"{k} has shape {list(v.shape)}, expected {list(shape)}")
    return problems


def _load_error_reason(e):
    """torch.load's reason on one line: without its boilerplate and its advice to load unsafely.

    A refused global reads "Weights only load failed. <advice to set weights_only=False>\n\n<the
    reason: Trying to load unsupported GLOBAL posix.system whose module posix is blocked.>\n\nCheck
    the documentation ..."; a class torch could allow-list has "WeightsUnpickler error: <reason>
    Please use torch.serialization.add_safe_globals ...".
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if m:
        reason = m.group(1)
    else:
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        keep = [p for p in paragraphs if not p.lstrip().startswith(("Weights only load failed", "Check the documentation"))]
        reason = " ".join(keep or paragraphs[:1])
    reason = re.split(r"\s+Please use `?torch\.serialization", " ".join(reason.split()))[0]  # advice to allow-list it
    return (reason or type(e).__name__)[:400]
