"""l2fast: the L2 (ridge) penalty over all parameters and its gradient, fused into one pass.

Importing `l2fast` does not import torch: `l2fast.infer` serves ONNX models with onnxruntime
alone. The ops (`torch.ops.l2fast.*`) are registered by `import l2fast` when torch is already
imported, else on first use of the API below, or with `import l2fast.ops`.
"""

import sys as _sys

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version(__name__)  # pyproject.toml's version: the one source
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_OPS_API = ("sq_norm", "l2_penalty", "l2_penalty_", "build_info", "L2Penalty", "decay_groups")

__all__ = list(_OPS_API)


def _load_ops():
    from . import functional, ops, penalty

    # Bind them as plain module attributes: later look-ups then skip __getattr__ (~1 µs each).
    modules = (penalty, functional, ops)
    globals().update({api: getattr(next(m for m in modules if hasattr(m, api)), api) for api in _OPS_API})


def __getattr__(name):
    if name == "optim":  # l2fast.optim.AdamW after a bare `import l2fast`
        import importlib

        return importlib.import_module(__name__ + ".optim")
    if name in _OPS_API:
        _load_ops()
        return globals()[name]
    raise AttributeError(f"module 'l2fast' has no attribute {name!r}")


if "torch" in _sys.modules:  # torch is loaded anyway: register torch.ops.l2fast.* now
    try:
        _load_ops()
    except ImportError:  # not built, or built for another torch: the API raises that on first use
        pass
