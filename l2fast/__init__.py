"""l2fast: the L2 (ridge) penalty over all parameters and its gradient, fused into one pass.

Importing `l2fast` does not import torch: `l2fast.infer` serves ONNX models with onnxruntime
alone. The torch API below (and the `torch.ops.l2fast.*` ops) loads on first use, or with
`import l2fast.ops`.
"""

__version__ = "0.1.0"

_OPS_API = ("sq_norm", "l2_penalty", "l2_penalty_", "build_info")

__all__ = list(_OPS_API)


def __getattr__(name):
    if name in _OPS_API:
        from . import ops

        # Bind them as plain module attributes: later look-ups then skip this hook (~1 µs each).
        globals().update({api: getattr(ops, api) for api in _OPS_API})
        return globals()[name]
    raise AttributeError(f"module 'l2fast' has no attribute {name!r}")
