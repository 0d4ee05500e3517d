"""Shared by the export and infer tests."""
import textwrap
from pathlib import Path

import l2fast

# Subprocesses import the same l2fast as the tests: the source tree, or the installed package
# (CI installs it, compiled extension included, and runs pytest from tests/).
PKG_ROOT = Path(l2fast.__file__).resolve().parents[1]

# Put first on PYTHONPATH as sitecustomize.py: makes `import torch` (and anything under it) raise ImportError.
TORCH_BLOCKER = textwrap.dedent("""
    import sys

    class _BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, _BlockTorch())
""")
