"""l2fast.checkpoint: save/load round trip, and checkpoints that must be refused before anything is built."""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from l2fast import checkpoint  # noqa: E402
from l2fast.errors import CheckpointError  # noqa: E402
from l2fast.model import MLP  # noqa: E402
from helpers import PKG_ROOT  # noqa: E402


def _save(path, state_dict, layer_sizes, **extra):
    torch.save({"state_dict": state_dict, "model_config": {"layer_sizes": layer_sizes},
                "dataset": {"name": "sample", "data_dir": "data"}, **extra}, path)
    return path


@pytest.fixture
def no_build(monkeypatch):
    """checkpoint.load must refuse these before it builds (allocates) the model the config describes."""
    built = []

    class Spy(MLP):
        def __init__(self, layer_sizes=(784, 64, 32, 10)):
            if torch.get_default_device().type != "meta":
                built.append(list(layer_sizes))
                raise AssertionError(f"built MLP({list(layer_sizes)}) before checking the weights")
            super().__init__(layer_sizes)

    monkeypatch.setattr(checkpoint, "MLP", Spy)
    return built


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MLP((784, 20, 10))
    checkpoint.save(tmp_path / "run" / "model.pt", model, {"epochs": 1, "lr": 1e-4}, {"name": "sample"})
    loaded = checkpoint.load(tmp_path / "run")
    assert loaded.path == tmp_path / "run" / "model.pt"
    assert not loaded.model.training and loaded.model.config() == {"layer_sizes": [784, 20, 10]}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.data["train_config"] == {"epochs": 1, "lr": 1e-4} and loaded.data["dataset"] == {"name": "sample"}
    assert set(loaded.data["versions"]) == {"l2fast", "torch", "numpy", "python"}
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["model.pt"]


def test_config_claiming_a_huge_model_is_refused_before_building_it(tmp_path, no_build):
    """[784, 30000, 30000, 10] in a 200 KB file used to allocate 4.1 GB before the shape error."""
    path = _save(tmp_path / "model.pt", MLP().state_dict(), [784, 30000, 30000, 10])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert str(path) in msg and "[30000, 784]" in msg and "[64, 784]" in msg and "\n" not in msg
    assert no_build == []


@pytest.mark.parametrize("sizes", [[784, 2 ** 40, 10], [784, 2 ** 70, 10], [784, 2 ** 40, 2 ** 40, 10]])
def test_absurd_layer_sizes_are_one_line_errors(tmp_path, no_build, sizes):
    path = _save(tmp_path / "model.pt", MLP().state_dict(), sizes)
    with pytest.raises(CheckpointError, match="a different architecture or a corrupted model_config"):
        checkpoint.load(path)
    assert no_build == []


def test_weights_of_the_wrong_type_are_refused(tmp_path, no_build):
    sd = MLP().state_dict()
    sd["layers.1.weight"] = sd["layers.1.weight"].to(torch.int64)
    with pytest.raises(CheckpointError, match="layers.1.weight is a torch.int64 tensor"):
        checkpoint.load(_save(tmp_path / "model.pt", sd, [784, 64, 32, 10]))


def test_non_finite_weights_are_refused(tmp_path):
    sd = MLP().state_dict()
    sd["layers.3.bias"][0] = float("nan")
    with pytest.raises(CheckpointError, match="layers.3.bias hold NaN or inf"):
        checkpoint.load(_save(tmp_path / "model.pt", sd, [784, 64, 32, 10]))


@pytest.mark.slow
def test_huge_config_through_the_cli_is_exit_2_without_traceback(tmp_path):
    _save(tmp_path / "model.pt", MLP().state_dict(), [784, 2 ** 40, 10])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(PKG_ROOT)
    r = subprocess.run([sys.executable, "-m", "l2fast.export", "model.pt", "--out", "out"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: model.pt: layer_sizes [784, 1099511627776, 10]") and r.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_shows_torchs_reason(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": MLP().state_dict(), "model_config": {"layer_sizes": [784, 64, 32, 10]},
                "payload": _RunsACommand(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert "GLOBAL posix.system" in msg and "blocked" in msg, msg
    assert "weights_only` set to `False`" not in msg and "\n" not in msg  # no advice to load it unsafely
    assert not marker.exists()


def test_a_class_torch_could_allow_list_is_named(tmp_path):
    from pathlib import PurePosixPath

    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": MLP().state_dict(), "model_config": {"layer_sizes": [784, 64, 32, 10]},
                "extra": PurePosixPath("somewhere")}, path)
    with pytest.raises(CheckpointError, match=r"weights_only=True \(Unsupported global: GLOBAL pathlib.PurePosixPath"):
        checkpoint.load(path)


def test_missing_paths_and_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        checkpoint.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.pt in this folder"):
        checkpoint.load(tmp_path)


# ----------------------------------------------------------------------------- issue 18: tracebacks in export

def _weight_as(kind):
    w = MLP().state_dict()["layers.1.weight"]
    if kind == "sparse":
        return w.to_sparse()
    if kind == "sparse_csr":
        return w.to_sparse_csr()
    if kind == "meta":
        return w.to("meta")
    if kind == "float8":
        return w.to(torch.float8_e4m3fn)
    if kind == "complex":
        return w.to(torch.complex64)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, expected", [
    ("sparse", "a torch.sparse_coo tensor"),
    ("sparse_csr", "a torch.sparse_csr tensor"),
    ("meta", "on the meta device"),
    ("float8", "a torch.float8_e4m3fn tensor"),
    ("complex", "a torch.complex64 tensor"),
])
def test_weights_that_are_not_dense_floats_on_the_cpu_are_refused(tmp_path, no_build, kind, expected):
    """A sparse or meta tensor was a load_state_dict traceback; float8 an isfinite traceback."""
    sd = MLP().state_dict()
    sd["layers.1.weight"] = _weight_as(kind)
    path = _save(tmp_path / "model.pt", sd, [784, 64, 32, 10])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert str(path) in msg and "layers.1.weight" in msg and expected in msg and "\n" not in msg, msg
    assert "expected" in msg and no_build == []


@pytest.mark.parametrize("where", ["train_config", "dataset"])
def test_metadata_that_is_not_strict_json_is_refused(tmp_path, where):
    """A NaN in train_config failed after verification, writing the manifest (`not JSON compliant`)."""
    extra = {"train_config": {"lr": 1e-4}, "dataset": {"name": "sample", "data_dir": "data"}}
    extra[where]["bad"] = [1.0, float("nan")]
    path = tmp_path / "model.pt"
    torch.save({"state_dict": MLP().state_dict(), "model_config": {"layer_sizes": [784, 64, 32, 10]}, **extra}, path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert str(path) in msg and f"{where}['bad'][1] is nan" in msg and "\n" not in msg, msg
