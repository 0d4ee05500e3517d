"""The training checkpoint: save, load (weights_only) and validate; the versions recorded in it.

A checkpoint is a dict saved with torch.save:
  state_dict    the MLP's tensors, on CPU
  model_config  {"layer_sizes": [784, ..., 10]}: what l2fast.model.MLP(**model_config) builds
  train_config  the training options, plain JSON-able values
  dataset       {"name": ..., "data_dir": ...}: what the model was trained and tested on
  versions      l2fast, torch, numpy, python
"""
import platform
import re
from pathlib import Path
from typing import NamedTuple

import torch

from ._io import atomic_path
from .contract import IMAGE_SHAPE, N_CLASSES
from .errors import CheckpointError
from .model import MLP

CHECKPOINT_FILE = "model.pt"
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
    """Write `model` (an l2fast MLP) as a checkpoint at `path`, atomically."""
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.config(),
        "train_config": dict(train_config),
        "dataset": dict(dataset),
        "versions": versions(),
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


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
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip, weights_only refusals: all mean "not ours"
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True "
                              f"({_load_error_reason(e)}); {_EXPECTED}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) \
            or not isinstance(ckpt.get("model_config"), dict):
        what = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict with keys {sorted(map(str, ckpt))[:8]}"
        raise CheckpointError(f"{path}: not an l2fast checkpoint (found {what}); {_EXPECTED}")
    config = ckpt["model_config"]
    sizes = config.get("layer_sizes")
    if not isinstance(sizes, (list, tuple)) or len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise CheckpointError(f"{path}: model_config {config!r} has no valid layer_sizes; {_EXPECTED}")
    want_in = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
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
    return Checkpoint(model.eval(), ckpt, path)


def _load_error_reason(e):
    """The informative part of a torch.load error, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\s+Please use|\n\n|$)", text, re.S)
    reason = m.group(1) if m else (text.strip().splitlines() or [""])[0]
    reason = " ".join(reason.split())
    return (reason or type(e).__name__)[:200]
