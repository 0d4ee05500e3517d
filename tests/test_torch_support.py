"""l2fast across torch releases: what each supported torch checks of the ops' registrations, and the
refusal of a torch older than the supported range (l2fast/_torch_support.py)."""
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import l2fast
from l2fast import _torch_support, ops

ROOT = Path(__file__).resolve().parents[1]


def _views(*shapes):
    """float64 views into one shared buffer (a slice and a transpose among them), as parameters are."""
    base = torch.randn(sum(torch.Size(s).numel() * 2 for s in shapes) + 3, dtype=torch.float64)
    out, at = [], 3
    for s in shapes:
        n = torch.Size(s).numel()
        out.append(base[at:at + 2 * n:2].reshape(s))
        at += 2 * n
    return [t.t() if t.dim() == 2 else t for t in out]


class TestDoubleBackward:
    """The dispatcher drops an argument equal to its default (weights=None) before autograd sees it.
    torch 2.11-2.13 require the double backward to return exactly one gradient per argument passed
    (a longer return fails with "Expected the return from backward to be of the same structure as
    the inputs"); 2.14 trims the extra ones, hiding the mistake."""

    def _ctx(self, params, needs_input_grad, weights=None):
        grad = torch.tensor(0.8, dtype=torch.float64)
        return types.SimpleNamespace(saved_tensors=(grad, *params), weight=0.35, weights=weights,
                                     needs_input_grad=needs_input_grad)

    @pytest.mark.parametrize("weights", [None, [2.0, 0.0]], ids=["weights omitted", "weights passed"])
    def test_one_gradient_per_argument_passed(self, weights):
        params = _views((3, 4), (5,))
        passed = (True, [True, True], False) + ((False,) if weights is not None else ())
        ctx = self._ctx(params, passed, weights)
        grad_outs = [torch.randn_like(p) for p in params]
        got = ops._backward_backward(ctx, grad_outs)
        assert isinstance(got, tuple) and len(got) == len(passed)
        assert isinstance(got[1], list) and len(got[1]) == len(params)
        assert all(g is None for g in got[2:])
        ws = weights or [1.0, 1.0]
        d_grad = sum(2 * 0.35 * w * (go * p).sum() for go, p, w in zip(grad_outs, params, ws))
        assert got[0].item() == pytest.approx(d_grad.item(), rel=1e-12)
        for d, go, w in zip(got[1], grad_outs, ws):
            torch.testing.assert_close(d, 2 * 0.35 * w * 0.8 * go, rtol=1e-12, atol=0)

    def test_no_gradient_computed_where_none_is_needed(self):
        params = _views((3, 4), (5,))
        got = ops._backward_backward(self._ctx(params, (False, [True, False], False)),
                                     [torch.randn_like(p) for p in params])
        assert got[0] is None and got[1][0] is not None and got[1][1] is None

    @pytest.mark.parametrize("weights", [None, [1.5, 0.0, -0.5]], ids=["weights omitted", "weights passed"])
    def test_gradgradcheck_of_l2_penalty_backward(self, weights):
        # The op itself, as torch's autograd calls it, on the torch running the tests.
        params = [p.requires_grad_() for p in _views((4, 3), (6,), (2, 2))]
        grad = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)

        def f(grad, *params):
            return tuple(torch.ops.l2fast.l2_penalty_backward(grad, list(params), 0.7, weights))

        assert torch.autograd.gradcheck(f, (grad, *params))
        assert torch.autograd.gradgradcheck(f, (grad, *params))


class TestSupportedRange:
    def test_parse(self):
        assert _torch_support.parse("2.11.0+cu130") == (2, 11)
        assert _torch_support.parse("2.15.0a0+git1234") == (2, 15)
        assert _torch_support.parse("3.0.1") == (3, 0)

    @pytest.mark.parametrize("version", ["2.10.1+cu128", "2.4.0", "1.13.1"])
    def test_older_torch_refused_in_one_line(self, version):
        why = _torch_support.problem(version)
        low = ".".join(map(str, _torch_support.MIN_TORCH))
        assert why == (f"l2fast needs torch >= {low} (tested: {_torch_support.TESTED}); torch {version} is "
                       f"installed: pip install 'torch>={low}'")
        assert "\n" not in why

    @pytest.mark.parametrize("version", ["2.11.0", "2.14.1+cu130", "2.15.0+cu132", "2.16.0.dev20270101", "3.0.0"])
    def test_supported_or_newer_accepted(self, version):
        assert _torch_support.problem(version) is None

    def test_running_torch_is_supported(self):
        assert _torch_support.problem(torch.__version__) is None

    def test_import_refuses_an_older_torch(self, tmp_path):
        # The installed torch reports an older release: loading the ops says so in one line and loads nothing.
        (tmp_path / "sitecustomize.py").write_text("import torch\ntorch.__version__ = '2.10.0+cu128'\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
        done = subprocess.run([sys.executable, "-c", "import sys, l2fast.ops"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        last = done.stderr.strip().splitlines()[-1]
        low = ".".join(map(str, _torch_support.MIN_TORCH))
        assert last == (f"ImportError: l2fast needs torch >= {low} (tested: {_torch_support.TESTED}); torch "
                        f"2.10.0+cu128 is installed: pip install 'torch>={low}'")

    def test_pyproject_states_the_same_minimum(self):
        if not (ROOT / "pyproject.toml").is_file():
            pytest.skip(f"tests are not in an l2fast checkout ({ROOT} has no pyproject.toml)")
        tomllib = pytest.importorskip("tomllib")
        deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        low = ".".join(map(str, _torch_support.MIN_TORCH))
        assert f"torch>={low}" in deps

    def test_ci_builds_and_tests_each_release_named_tested(self):
        # The releases the refusal names as tested are the ones CI builds with CUDA and op-tests.
        run = ROOT / ".ci" / "run"
        if not run.is_file():
            pytest.skip(f"tests are not in an l2fast checkout ({ROOT} has no .ci/run)")
        text = run.read_text()
        releases = [v.strip() for v in _torch_support.TESTED.replace(" and ", ", ").split(",")]
        assert releases[0].startswith(".".join(map(str, _torch_support.MIN_TORCH)) + ".")
        for release in releases:
            assert f"torch=={release}" in text or f" {release}" in text, f"{release} is not built in .ci/run"
