"""python -m l2fast.infer and l2fast.infer.Predictor: onnxruntime only, inputs, errors, manifest check.

The model is a fixture: MLP() with torch.manual_seed(0), 300 AdamW steps on the bundled sample,
exported in-process with l2fast.export.export_model (the CLI round trip is in test_export.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from l2fast import infer
from l2fast.idx import write_idx
from helpers import PKG_ROOT, TORCH_BLOCKER




def run_py(args, cwd, block_torch=True, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    paths = [str(PKG_ROOT)]
    if block_torch:
        block = Path(cwd) / "_block_torch"
        block.mkdir(exist_ok=True)
        (block / "sitecustomize.py").write_text(TORCH_BLOCKER)
        paths.insert(0, str(block))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_infer(argv, capsys):
    """In-process CLI: (exit code, stdout, stderr)."""
    rc = infer.cli(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def sample():
    from l2fast.data import load_dataset

    return load_dataset("sample")


@pytest.fixture(scope="module")
def model_and_export(sample, tmp_path_factory):
    torch = pytest.importorskip("torch")
    from l2fast import export as ex
    from l2fast.model import MLP

    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.from_numpy(sample.train_images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(sample.train_labels)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = tmp_path_factory.mktemp("infer") / "export"
    ex.export_model(model, out, sample.test_images[:500], sample.test_labels[:500], classes=sample.classes)
    return model, out


@pytest.fixture(scope="module")
def onnx_path(model_and_export):
    return model_and_export[1] / "model.onnx"


@pytest.fixture(scope="module")
def eager_probs(model_and_export, sample):
    import torch

    model = model_and_export[0]
    with torch.inference_mode():
        logits = model(torch.from_numpy(sample.test_images[:64].astype(np.float32)[:, None] / 255))
    return torch.softmax(logits, 1).numpy()


@pytest.fixture
def inputs(sample, tmp_path):
    """A folder with the first test digits as PNG, JPEG, npy (uint8 and float) and IDX files."""
    from PIL import Image

    imgs = sample.test_images[:8]
    Image.fromarray(imgs[0]).save(tmp_path / "d0.png")
    Image.fromarray(imgs[1]).save(tmp_path / "d1.png")
    np.save(tmp_path / "u8.npy", imgs)
    np.save(tmp_path / "f32.npy", (imgs.astype(np.float32) / 255)[:, None])
    write_idx(tmp_path / "imgs-idx3-ubyte", imgs)
    write_idx(tmp_path / "imgs-idx3-ubyte.gz", imgs)
    return tmp_path


# ----------------------------------------------------------------------------- torch-free

def test_import_does_not_import_torch_or_pillow(tmp_path):
    r = run_py(["-c", "import sys, l2fast, l2fast.infer; "
                      "assert 'torch' not in sys.modules, 'torch'; assert 'PIL' not in sys.modules, 'PIL'; "
                      "print('clean')"], cwd=tmp_path, block_torch=False)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


def test_cli_runs_when_torch_cannot_be_imported(onnx_path, inputs, eager_probs):
    r = run_py(["-c", "import torch"], cwd=inputs)
    assert r.returncode != 0 and "torch is blocked" in r.stderr  # the blocker works
    r = run_py(["-m", "l2fast.infer", str(onnx_path), "d0.png", "u8.npy", "imgs-idx3-ubyte.gz", "--top-k", "3"],
               cwd=inputs)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 + 8 + 8
    assert lines[0].startswith("d0.png: ") and lines[1].startswith("u8.npy[0]: ")
    assert lines[9].startswith("imgs-idx3-ubyte.gz[0]: ")
    assert all(line.count(" | ") == 2 for line in lines)
    assert "CPUExecutionProvider" in r.stderr and "CPUExecutionProvider" not in r.stdout
    # a npy-only run never needs Pillow; the Predictor API works without torch too
    code = ("import sys, numpy as np; from l2fast.infer import Predictor; "
            f"p = Predictor({str(onnx_path)!r}); c, pr = p.predict(np.load('u8.npy')); "
            "assert 'torch' not in sys.modules and 'PIL' not in sys.modules; print(c.tolist())")
    r = run_py(["-c", code], cwd=inputs)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == eager_probs[:8].argmax(1).tolist()


# ----------------------------------------------------------------------------- predictions

def test_predictor_api_matches_eager(onnx_path, sample, eager_probs):
    p = infer.Predictor(onnx_path, threads=1)
    assert p.provider == "CPUExecutionProvider" and p.n_classes == 10 and p.labels == sample.classes
    pred = p.predict(sample.test_images[:64])
    classes, probs = pred  # a NamedTuple: unpacks
    assert classes.dtype == np.int64 and classes.shape == (64,)
    assert probs.dtype == np.float32 and probs.shape == (64, 10)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (classes == eager_probs.argmax(1)).all()
    assert np.abs(probs - eager_probs).max() < 1e-5
    top_c, top_p = pred.top_k(3)
    assert top_c.shape == (64, 3) and (top_c[:, 0] == classes).all() and (np.diff(top_p, axis=1) <= 0).all()
    # float input [N,1,28,28] in [0,1] gives the same answer
    same = p.predict(sample.test_images[:64].astype(np.float64)[:, None] / 255)
    assert (same.classes == classes).all() and np.allclose(same.probabilities, probs, atol=1e-6)


def test_predictor_rejects_bad_arrays(onnx_path):
    p = infer.Predictor(onnx_path)
    for bad, needle in ((np.zeros((2, 32, 32), np.uint8), "shape [2, 32, 32]"),
                        (np.zeros((2, 2, 28, 28), np.uint8), "shape [2, 2, 28, 28]"),
                        (np.zeros((28,), np.uint8), "shape [28]"),
                        (np.zeros((2, 28, 28), np.int64), "dtype int64"),
                        (np.full((2, 28, 28), 2.0), "span [2, 2]"),
                        (np.full((1, 28, 28), np.nan, np.float32), "NaN")):
        with pytest.raises(infer.InputError, match=r"expected \[N,28,28\] or \[N,1,28,28\]") as e:
            p.predict(bad)
        assert needle in str(e.value)


def test_every_input_kind_agrees(onnx_path, inputs, eager_probs, capsys):
    rc, out, err = run_infer([str(onnx_path), str(inputs / "d0.png"), str(inputs / "d1.png"), str(inputs / "u8.npy"),
                              str(inputs / "f32.npy"), str(inputs / "imgs-idx3-ubyte"),
                              str(inputs / "imgs-idx3-ubyte.gz"), "--json", "--top-k", "2"], capsys)
    assert rc == 0, err
    recs = [json.loads(line) for line in out.splitlines()]
    assert len(recs) == 2 + 4 * 8
    expected = eager_probs[:8].argmax(1)
    assert [r["class"] for r in recs[:2]] == expected[:2].tolist()
    for k in range(4):
        chunk = recs[2 + 8 * k: 10 + 8 * k]
        assert [r["class"] for r in chunk] == expected.tolist()
        assert [r["index"] for r in chunk] == list(range(8))
        assert np.allclose([r["probability"] for r in chunk], eager_probs[:8].max(1), atol=1e-5)
    for r in recs:
        assert set(r) == {"input", "index", "class", "label", "probability", "top_k"}
        assert len(r["top_k"]) == 2 and r["top_k"][0]["class"] == r["class"]
        assert r["top_k"][0]["probability"] >= r["top_k"][1]["probability"]
        assert r["label"].startswith(str(r["class"]))


def test_small_batches_give_the_same_output(onnx_path, inputs, capsys):
    args = [str(onnx_path), str(inputs / "u8.npy"), str(inputs / "d0.png"), str(inputs / "f32.npy")]
    rc1, out1, _ = run_infer(args, capsys)
    rc2, out2, _ = run_infer(args + ["--batch-size", "3", "--threads", "1"], capsys)
    assert rc1 == rc2 == 0 and out1 == out2 and len(out1.splitlines()) == 17


def paper_digits(sample, tmp_path, n=10):
    """n test digits saved as dark-on-white PNGs (a digit written on paper): (the digits, the paths)."""
    from PIL import Image

    imgs = sample.test_images[:n]
    names = []
    for i, im in enumerate(imgs):
        Image.fromarray(255 - im).save(tmp_path / f"paper{i}.png")
        names.append(str(tmp_path / f"paper{i}.png"))
    return imgs, names


def test_black_on_white_images_need_invert_or_auto(onnx_path, sample, tmp_path, capsys):
    imgs, names = paper_digits(sample, tmp_path)
    ref = infer.Predictor(onnx_path).predict(imgs).classes.tolist()
    for opt in (["--invert"], ["--background", "white"], ["--background", "auto"]):
        rc, out, err = run_infer([str(onnx_path), *names, "--json", *opt], capsys)
        assert rc == 0, err
        assert [json.loads(line)["class"] for line in out.splitlines()] == ref, opt
    # auto leaves white-on-black images alone
    np.save(tmp_path / "x.npy", imgs)
    rc, out, _ = run_infer([str(onnx_path), str(tmp_path / "x.npy"), "--json", "--background", "auto"], capsys)
    assert [json.loads(line)["class"] for line in out.splitlines()] == ref
    # npy arrays follow --background too
    np.save(tmp_path / "inv.npy", 255 - imgs)
    rc, out, _ = run_infer([str(onnx_path), str(tmp_path / "inv.npy"), "--json", "--invert"], capsys)
    assert [json.loads(line)["class"] for line in out.splitlines()] == ref


def test_large_photo_like_images_are_fitted_like_mnist(onnx_path, sample, tmp_path):
    """A digit scaled 10x, dark on a light canvas, as JPEG: fitted back into 20x20 and centered."""
    from PIL import Image

    imgs = sample.test_images[:40]
    fitted = []
    for i, im in enumerate(imgs):
        big = Image.fromarray(255 - im).resize((280, 280), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (420, 360), 255)
        canvas.paste(big, (90, 30))
        path = tmp_path / f"photo{i}.jpg"
        canvas.convert("RGB").save(path, quality=92)
        fitted.append(infer.load_image(path, background="auto"))
    fitted = np.stack(fitted)
    assert fitted.shape == (40, 28, 28) and fitted.dtype == np.uint8
    for f in fitted:
        rows, cols = np.nonzero(f > infer.FIT_THRESHOLD)
        assert rows.max() - rows.min() < 21 and cols.max() - cols.min() < 21
        w = f.astype(np.float64)
        cy = (w.sum(1) * np.arange(28)).sum() / w.sum()
        cx = (w.sum(0) * np.arange(28)).sum() / w.sum()
        assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5  # where MNIST puts it
    p = infer.Predictor(onnx_path)
    agree = (p.predict(fitted).classes == p.predict(imgs).classes).mean()
    assert agree >= 0.95, agree  # 40 of 40 (38 while the fit centred the mass at 13.5)


def test_fit_modes(tmp_path):
    from PIL import Image

    im = np.zeros((60, 40), np.uint8)
    im[10:50, 15:25] = 255
    Image.fromarray(im).save(tmp_path / "bar.png")
    stretched = infer.load_image(tmp_path / "bar.png", fit="stretch")
    fitted = infer.load_image(tmp_path / "bar.png", fit="mnist")
    assert stretched.shape == fitted.shape == (28, 28)
    rows, cols = np.nonzero(fitted > 64)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 5  # aspect kept
    with pytest.raises(infer.InputError, match="expected 28x28 with --fit none"):
        infer.load_image(tmp_path / "bar.png", fit="none")
    blank = np.zeros((50, 50), np.uint8)
    Image.fromarray(blank).save(tmp_path / "blank.png")
    assert not infer.load_image(tmp_path / "blank.png").any()
    # any 28x28 image is used as is under --fit none (auto keeps only what looks like MNIST, below)
    exact = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(exact).save(tmp_path / "exact.png")
    with pytest.warns(infer.FitWarning):
        assert np.array_equal(infer.load_image(tmp_path / "exact.png", background="black", fit="none"), exact)


def test_transparent_png_is_flattened_onto_white(onnx_path, sample, tmp_path):
    from PIL import Image

    im = sample.test_images[0]
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = im  # black ink whose opacity is the digit
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ink.png")
    got = infer.load_image(tmp_path / "ink.png", background="auto")
    assert np.abs(got.astype(int) - im.astype(int)).max() <= 1


# ----------------------------------------------------------------------------- bad inputs

def _bad_inputs(tmp_path, sample):
    from PIL import Image

    bad = {}
    (tmp_path / "garbage.png").write_bytes(b"definitely not an image")
    bad["garbage.png"] = "cannot decode"
    Image.fromarray(sample.test_images[0]).resize((100, 100)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    bad["truncated.png"] = "cannot decode"
    np.save(tmp_path / "shape.npy", np.zeros((3, 32, 32), np.uint8))
    bad["shape.npy"] = "shape [3, 32, 32]"
    np.save(tmp_path / "dtype.npy", np.zeros((3, 28, 28), np.int64))
    bad["dtype.npy"] = "dtype int64"
    np.save(tmp_path / "range.npy", np.full((2, 1, 28, 28), 255.0, np.float32))
    bad["range.npy"] = "span [255, 255]"
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    bad["broken.npy"] = "not a readable .npy"
    write_idx(tmp_path / "labels-idx1-ubyte", sample.test_labels[:10].astype(np.uint8))
    bad["labels-idx1-ubyte"] = "header says uint8 [10]"
    write_idx(tmp_path / "whole-idx3-ubyte", sample.test_images[:4])
    (tmp_path / "cut-idx3-ubyte").write_bytes((tmp_path / "whole-idx3-ubyte").read_bytes()[:-100])
    bad["cut-idx3-ubyte"] = "truncated"
    bad["missing.png"] = "file not found"
    return bad


def test_bad_inputs_are_named_and_good_ones_still_predicted(onnx_path, inputs, sample, capsys):
    bad = _bad_inputs(inputs, sample)
    argv = [str(onnx_path), str(inputs / "d0.png")] + [str(inputs / b) for b in bad] + [str(inputs / "u8.npy")]
    rc, out, err = run_infer(argv, capsys)
    assert rc == 1
    assert "Traceback" not in err
    lines = out.splitlines()
    assert len(lines) == 1 + 8 and lines[0].startswith(str(inputs / "d0.png"))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad) + 1  # one per input + the summary
    for (name, needle), line in zip(bad.items(), errors):
        assert str(inputs / name) in line and needle in line, (name, line)
        assert "expected" in line or "not found" in line, line
    assert f"{len(bad)} of {len(bad) + 2} inputs could not be read" in errors[-1]
    # --json: error records in order, among the predictions
    rc, out, err = run_infer(argv + ["--json"], capsys)
    assert rc == 1
    recs = [json.loads(line) for line in out.splitlines()]
    assert len(recs) == 1 + len(bad) + 8
    assert [r["input"] for r in recs[1:1 + len(bad)]] == [str(inputs / b) for b in bad]
    assert all("error" in r for r in recs[1:1 + len(bad)]) and "class" in recs[-1]


def test_bad_input_cli_subprocess_exit_1(onnx_path, inputs):
    (inputs / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 junk")
    r = run_py(["-m", "l2fast.infer", str(onnx_path), "junk.jpg", "d0.png"], cwd=inputs)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "error: junk.jpg: cannot decode" in r.stderr
    assert r.stdout.startswith("d0.png: ")


# ----------------------------------------------------------------------------- bad models

def test_bad_models_are_usage_errors(onnx_path, inputs, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    data = onnx_path.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.onnx").write_text("hello, not a model\n")
    (tmp_path / "empty.onnx").write_bytes(b"")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 32, 32])
    other = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(other, str(tmp_path / "other.onnx"))
    cases = {"missing.onnx": "not found", "truncated.onnx": "not a valid ONNX model",
             "text.onnx": "not a valid ONNX model", "empty.onnx": "not a valid ONNX model",
             "other.onnx": "expected float32 [batch, 1, 28, 28]"}
    for name, needle in cases.items():
        rc, out, err = run_infer([str(tmp_path / name), str(inputs / "d0.png")], capsys)
        assert rc == 2, (name, err)
        assert out == "" and err.count("\n") == 1 and err.startswith("error: "), (name, err)
        assert str(tmp_path / name) in err and needle in err, (name, err)
    rc, _, err = run_infer([str(tmp_path), str(inputs / "d0.png")], capsys)
    assert rc == 2 and "folder" in err


def test_usage_errors(onnx_path, inputs, capsys):
    for extra, needle in ((["--top-k", "0"], "--top-k 0"), (["--batch-size", "0"], "--batch-size 0"),
                          (["--threads", "0"], "threads=0")):
        rc, out, err = run_infer([str(onnx_path), str(inputs / "d0.png"), *extra], capsys)
        assert rc == 2 and needle in err and out == ""
    rc, out, err = run_infer([str(onnx_path)], capsys)  # argparse: no inputs, one line too
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and "INPUT" in err


def test_manifest_sha256_rejects_a_corrupted_model(model_and_export, inputs, tmp_path, capsys):
    import shutil

    src = model_and_export[1]
    good = tmp_path / "good"
    shutil.copytree(src, good)
    rc, out, err = run_infer([str(good / "model.onnx"), str(inputs / "d0.png")], capsys)
    assert rc == 0 and "note:" not in err
    # flip one byte inside a weight: still a valid ONNX file, but not the exported one
    data = bytearray((good / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (good / "model.onnx").write_bytes(bytes(data))
    rc, out, err = run_infer([str(good / "model.onnx"), str(inputs / "d0.png")], capsys)
    assert rc == 2 and out == ""
    assert "sha256" in err and "manifest.json" in err and "corrupted" in err and err.count("\n") == 1
    with pytest.raises(infer.ModelError, match="sha256"):
        infer.Predictor(good / "model.onnx")
    infer.Predictor(good / "model.onnx", verify_manifest=False)  # an explicit opt-out in the API
    # a model renamed away from what the manifest lists: served, with a note
    shutil.copy(src / "model.onnx", good / "renamed.onnx")
    rc, out, err = run_infer([str(good / "renamed.onnx"), str(inputs / "d0.png")], capsys)
    assert rc == 0 and "note:" in err and "was not checked" in err
    # an unreadable manifest is an error, not silently ignored
    (good / "manifest.json").write_text("{not json")
    rc, out, err = run_infer([str(good / "renamed.onnx"), str(inputs / "d0.png")], capsys)
    assert rc == 2 and "manifest.json" in err


def test_model_without_manifest_uses_digit_labels(model_and_export, inputs, tmp_path, capsys):
    import shutil

    shutil.copy(model_and_export[1] / "model.onnx", tmp_path / "m.onnx")
    rc, out, err = run_infer([str(tmp_path / "m.onnx"), str(inputs / "d0.png"), "--json"], capsys)
    assert rc == 0
    rec = json.loads(out)
    assert rec["label"] == str(rec["class"])


# ----------------------------------------------------------------------------- benchmark

@pytest.mark.slow
def test_bench_infer_smoke(onnx_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "l2fast.bench", "infer", "--model", str(onnx_path), "--iters", "30",
                        "--rounds", "2", "--reps", "2", "--batch", "64", "--json", str(tmp_path / "b.json")],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(PKG_ROOT)}, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "b.json").read_text())
    assert {"eager PyTorch", "TorchScript", "onnxruntime run"} <= set(doc["results"])
    for row in doc["results"].values():
        assert row["p50_us"] > 0 and row["throughput_img_s"] > 0 and row["latency_samples"] == 60
    assert "| eager PyTorch |" in r.stdout and "target onnxruntime batch-1 p50" in r.stdout
    # the Predictor row sits beside raw onnxruntime from the same uint8 input, with its ratios judged
    assert {"l2fast Predictor from uint8", "onnxruntime run from uint8 (raw)"} <= set(doc["results"])
    assert doc["targets"]["predictor_p50_vs_raw"] > 0 and set(doc["targets"]["met"]) >= {"predictor_p50", "predictor_throughput"}
    assert "target Predictor batch-1 p50 <= 1.5x raw onnxruntime" in r.stdout
    r = subprocess.run([sys.executable, "-m", "l2fast.bench", "infer", "--model", str(tmp_path / "nope.onnx")],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(PKG_ROOT)}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not found" in r.stderr


def test_bench_infer_refuses_a_batch_it_cannot_run_up_front(tmp_path):
    """--batch 3000000 peaked at 13.7 GB, then failed in torch.export's guard (batch <= 2**20)."""
    from l2fast.bench.infer import MAX_BATCH

    for batch in (3_000_000, MAX_BATCH + 1):
        r = subprocess.run([sys.executable, "-m", "l2fast.bench", "infer", "--model", str(tmp_path / "nope.onnx"),
                            "--batch", str(batch)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(PKG_ROOT)},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"error: --batch {batch}: expected 1..{MAX_BATCH:,}"), r.stderr


# ----------------------------------------------------------------------------- issue 8: the Predictor

def test_predictor_takes_one_image_without_a_batch_axis(onnx_path, sample):
    p = infer.Predictor(onnx_path, threads=1)
    batch = p.predict(sample.test_images[:3])
    for i in range(3):
        one = p.predict(sample.test_images[i])  # [28, 28]
        assert one.classes.shape == (1,) and one.probabilities.shape == (1, 10)
        assert one.classes[0] == batch.classes[i]
        assert np.abs(one.probabilities[0] - batch.probabilities[i]).max() < 1e-6
    # a strided view (a column slice of a wider canvas) is a valid image too
    canvas = np.zeros((28, 56), np.uint8)
    canvas[:, ::2] = sample.test_images[0]
    view = canvas[:, ::2]
    assert not view.flags.c_contiguous
    assert p.predict(view).classes[0] == batch.classes[0]


def test_softmax_matches_a_float64_reference():
    from l2fast.predictor import softmax_argmax

    rng = np.random.default_rng(0)
    for n in (1, 3, 1024):
        for scale in (1.0, 40.0, 300.0):  # 300: the logits overflow exp() unless shifted
            z = (rng.standard_normal((n, 10)) * scale).astype(np.float32)
            ref = np.exp(z.astype(np.float64) - z.max(1, keepdims=True))
            ref /= ref.sum(1, keepdims=True)
            classes, probs = softmax_argmax(z.copy())
            assert probs.dtype == np.float32 and classes.dtype == np.int64
            assert np.isfinite(probs).all() and np.abs(probs - ref).max() < 1e-6, (n, scale)
            assert (classes == z.argmax(1)).all()


# ----------------------------------------------------------------------------- issue 9: bounded inputs

def _peak_rss_mb(argv, cwd, timeout=300):
    """Run the infer CLI in a fresh Python (torch blocked), stdout to /dev/null; (exit code, peak RSS MB, stderr)."""
    # VmHWM, not getrusage's ru_maxrss: that one keeps the high-water mark of the forking pytest across exec.
    code = ("import sys; from l2fast import infer; "
            f"rc = infer.cli({argv!r}); sys.stdout.flush(); "
            "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]; "
            "print('PEAK_KB', hwm[0], file=sys.stderr); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    block = Path(cwd) / "_block_torch"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(TORCH_BLOCKER)
    env["PYTHONPATH"] = os.pathsep.join([str(block), str(PKG_ROOT)])
    with open(os.devnull, "w") as devnull:
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, stdout=devnull, stderr=subprocess.PIPE,
                           text=True, timeout=timeout)
    peak = [line for line in r.stderr.splitlines() if line.startswith("PEAK_KB")]
    return r.returncode, (int(peak[0].split()[1]) / 1024 if peak else None), r.stderr


N_BIG = 200_000  # 157 MB of pixels: ~1 GB peak when read whole and converted to float32 at once


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS read from /proc/self/status (Linux)")
@pytest.mark.slow
def test_large_gzip_idx_and_npy_stream_with_bounded_memory(onnx_path, sample, tmp_path):
    import gzip

    digits = np.tile(sample.test_images[:1000], (N_BIG // 1000, 1, 1))
    with gzip.open(tmp_path / "big-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(bytes([0, 0, 8, 3]) + np.asarray([N_BIG, 28, 28], ">u4").tobytes())
        for i in range(0, N_BIG, 10_000):
            f.write(digits[i:i + 10_000].tobytes())
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(N_BIG, 28, 28))
    big[:] = digits
    big.flush()
    del big, digits
    assert (tmp_path / "big-idx3-ubyte.gz").stat().st_size < 40e6
    for name in ("big-idx3-ubyte.gz", "big.npy"):
        rc, peak_mb, err = _peak_rss_mb([str(onnx_path), name, "--threads", "1"], tmp_path)
        assert rc == 0, err[-2000:]
        # Read whole, this input alone is 157 MB of uint8 and 627 MB as float32.
        assert peak_mb < 400, (name, peak_mb)


def test_npy_header_claiming_more_than_the_file_holds(onnx_path, inputs, capsys):
    header = {"descr": "|u1", "fortran_order": False, "shape": (10 ** 9, 28, 28)}
    with open(inputs / "bomb.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(72))
    assert (inputs / "bomb.npy").stat().st_size < 300
    argv = [str(onnx_path), str(inputs / "d0.png"), str(inputs / "bomb.npy"), str(inputs / "u8.npy")]
    rc, out, err = run_infer(argv, capsys)
    assert rc == 1 and "Traceback" not in err
    assert len(out.splitlines()) == 1 + 8
    line = [e for e in err.splitlines() if "bomb.npy" in e]
    assert len(line) == 1 and line[0].startswith("error: ")
    assert "784,000,000,000 bytes" in line[0] and "holds 72 bytes" in line[0] and "truncated" in line[0]


def test_cut_gzip_idx_is_named_and_the_others_answered(onnx_path, inputs, capsys):
    data = (inputs / "imgs-idx3-ubyte.gz").read_bytes()
    (inputs / "cut-idx3-ubyte.gz").write_bytes(data[: len(data) * 2 // 3])
    rc, out, err = run_infer([str(onnx_path), str(inputs / "cut-idx3-ubyte.gz"), str(inputs / "d0.png")], capsys)
    assert rc == 1 and "Traceback" not in err
    assert out.startswith(str(inputs / "d0.png")) and len(out.splitlines()) == 1
    assert f"error: {inputs / 'cut-idx3-ubyte.gz'}: " in err and "truncated" in err


# ----------------------------------------------------------------------------- issue 9: exit-2 contract

def test_threads_out_of_range_is_one_line_not_a_hang(onnx_path, inputs):
    r = run_py(["-m", "l2fast.infer", str(onnx_path), "d0.png", "--threads", "100000"], cwd=inputs, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    # checked once, by the Predictor, before the model is read
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: threads=100000: expected 1..")
    with pytest.raises(infer.UsageError, match="threads=100000"):
        infer.Predictor(onnx_path, threads=100000)


def test_model_that_fails_at_run_time(inputs, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    # The l2fast signature, but Gather reads column 999 of a 784-wide row: onnxruntime fails in run().
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    idx = helper.make_tensor("idx", TensorProto.INT64, [10], [999] * 10)
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1),
             helper.make_node("Gather", ["flat", "idx"], ["logits"], axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [idx]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "broken.onnx"))
    rc, out, err = run_infer([str(tmp_path / "broken.onnx"), str(inputs / "d0.png")], capsys)
    assert rc == 2 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(tmp_path / "broken.onnx") in errors[0] and "failed to run" in errors[0]


# ----------------------------------------------------------------------------- issue 9: silent wrong predictions

def test_16bit_png_and_int32_float_tiffs_keep_their_grey_levels(sample, tmp_path):
    from PIL import Image

    digit = sample.test_images[0]
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "d16.png")
    Image.fromarray(digit.astype(np.int32) * 257).save(tmp_path / "d32.tif")
    Image.fromarray(digit.astype(np.float32) / 255).save(tmp_path / "df.tif")
    assert Image.open(tmp_path / "d16.png").mode.startswith("I")
    for name in ("d16.png", "d32.tif", "df.tif"):
        got = infer.load_image(tmp_path / name, background="black")
        assert np.abs(got.astype(int) - digit.astype(int)).max() <= 1, name
        assert len(np.unique(got)) > 2, name


def test_white_digit_on_transparent_background_is_kept(sample, tmp_path):
    from PIL import Image

    digit = sample.test_images[0]
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = digit  # white ink whose opacity is the digit, nothing behind it
    Image.fromarray(rgba, "RGBA").save(tmp_path / "chalk.png")
    for background in ("auto", "black"):
        got = infer.load_image(tmp_path / "chalk.png", background=background)
        assert np.abs(got.astype(int) - digit.astype(int)).max() <= 1, background


def test_dark_digit_on_paper_is_right_by_default_and_black_warns(onnx_path, sample, tmp_path, capsys):
    imgs, names = paper_digits(sample, tmp_path)
    ref = infer.Predictor(onnx_path).predict(imgs).classes.tolist()
    rc, out, err = run_infer([str(onnx_path), *names, "--json"], capsys)  # no --background: the default
    assert rc == 0, err
    assert [json.loads(line)["class"] for line in out.splitlines()] == ref
    assert "warning:" not in err
    rc, out, err = run_infer([str(onnx_path), *names, "--json", "--background", "black"], capsys)
    assert rc == 0
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warned) >= len(names) and all("--background" in w for w in warned)
    recs = [json.loads(line) for line in out.splitlines()]
    assert all(any("border is light" in w for w in r["warnings"]) for r in recs)


# ----------------------------------------------------------------------------- issue 18: hostile files

def _png(path, width, height, rgba=False, rows=None):
    """A valid PNG of width x height pixels (8-bit L, or RGBA), written row by row so that a huge
    image costs the test no memory: rows(y) gives a row's bytes (default: black, fully transparent)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = 4 if rgba else 1
    blank = bytes(width * channels)
    z = zlib.compressobj(9)
    body = bytearray()
    for y in range(height):
        body += z.compress(b"\0" + (rows(y) if rows else blank))
    body += z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6 if rgba else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", bytes(body)) + chunk(b"IEND", b""))
    return path


def _batches(path, **kwargs):
    from l2fast.inputs import iter_batches

    return np.concatenate([b.images for b in iter_batches(path, background="black", **kwargs)])


def test_fortran_order_npy_is_read_as_saved(sample, tmp_path):
    """A Fortran-order [28,28] digit was read transposed: a silently wrong prediction."""
    digits = sample.test_images[:5]
    assert not np.array_equal(digits[0], digits[0].T)
    cases = {"one": digits[0], "batch": digits, "nchw": digits[:, None],
             "float-be": (digits[:, None].astype(">f4") / 255)}
    for name, array in cases.items():
        np.save(tmp_path / f"{name}.npy", np.asfortranarray(array))
        np.save(tmp_path / f"{name}-c.npy", np.ascontiguousarray(array))
        for batch_size in (2, 1024):
            got = _batches(tmp_path / f"{name}.npy", batch_size=batch_size)
            want = _batches(tmp_path / f"{name}-c.npy", batch_size=batch_size)
            assert got.dtype == want.dtype and np.array_equal(got, want), (name, batch_size)
        reference = digits[:1] if name == "one" else digits
        if got.dtype == np.uint8:
            assert np.array_equal(got, reference), name


@pytest.mark.parametrize("fortran", [False, True], ids=["C", "Fortran"])
def test_npy_header_whose_size_overflows_int64_is_refused(onnx_path, inputs, capsys, fortran):
    """(2**60 + 1, 28, 28) overflowed np.prod and passed the size check (exit 0); Fortran: a traceback."""
    header = {"descr": "|u1", "fortran_order": fortran, "shape": (2 ** 60 + 1, 28, 28)}
    with open(inputs / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(784))
    rc, out, err = run_infer([str(onnx_path), str(inputs / "huge.npy"), str(inputs / "d0.png")], capsys)
    assert rc == 1 and "Traceback" not in err, err
    assert out.startswith(str(inputs / "d0.png")) and len(out.splitlines()) == 1
    line = [e for e in err.splitlines() if "huge.npy" in e]
    assert len(line) == 1 and line[0].startswith("error: ") and "holds 784 bytes" in line[0], err


def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    """Pillow decodes up to 179 Mpx: a PNG of a few hundred KB cost gigabytes."""
    import tracemalloc

    from l2fast.inputs import MAX_IMAGE_PIXELS

    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    big = _png(tmp_path / "big.png", side, side)
    assert big.stat().st_size < 1e6
    tracemalloc.start()
    try:
        with pytest.raises(infer.InputError) as e:
            infer.load_image(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert str(big) in msg and f"{side}x{side}" in msg and f"{MAX_IMAGE_PIXELS:,}" in msg and "\n" not in msg
    assert peak < 1 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse an image from its header"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS read from /proc/self/status (Linux)")
def test_large_rgba_image_decodes_with_few_bytes_per_pixel(onnx_path, sample, tmp_path):
    """A 4000x4000 RGBA PNG of 66 KB cost 1.13 GB in infer (about 66 bytes a pixel)."""
    side, digit = 4000, sample.test_images[0]
    scale = side // 40

    def row(y):  # dark ink whose opacity is the digit, scaled up, in the middle of a transparent page
        r = np.zeros((side, 4), np.uint8)
        line = digit[min(27, max(0, (y - side // 2) // scale + 14))] if abs(y - side // 2) < 14 * scale else None
        if line is not None:
            r[side // 2 - 14 * scale:side // 2 + 14 * scale, 3] = np.repeat(line, scale)
        return r.tobytes()

    _png(tmp_path / "small.png", 28, 28, rgba=True)
    _png(tmp_path / "photo.png", side, side, rgba=True, rows=row)
    rc, base_mb, err = _peak_rss_mb([str(onnx_path), "small.png", "--threads", "1"], tmp_path)
    assert rc == 0, err[-2000:]
    rc, peak_mb, err = _peak_rss_mb([str(onnx_path), "photo.png", "--threads", "1"], tmp_path)
    assert rc == 0, err[-2000:]
    per_pixel = (peak_mb - base_mb) * 2 ** 20 / side ** 2
    assert per_pixel < 12, f"{per_pixel:.1f} bytes a pixel ({peak_mb:.0f} MB peak, {base_mb:.0f} MB for a 28x28 image)"


def test_fifo_and_devices_as_inputs_are_refused_not_waited_on(onnx_path, inputs):
    """A FIFO as an image hung infer forever, and the inputs after it were never answered."""
    os.mkfifo(inputs / "f.png")
    try:
        r = run_py(["-m", "l2fast.infer", str(onnx_path), "f.png", "/dev/zero", "u8.npy"], cwd=inputs, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("infer waited on a FIFO for 60 s")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: f.png: is a FIFO") and "expected a regular file" in errors[0], errors
    assert errors[1].startswith("error: /dev/zero: is a character device"), errors
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == [f"u8.npy[{i}]" for i in range(8)]


# ----------------------------------------------------------------------------- digits drawn by hand (issue 20)

def _font(size):
    """A TrueType font of `size` px: DejaVu Sans where the machine has it, else Pillow's default
    font scaled (Pillow >= 10.1 ships a scalable one)."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def _drawn(size, strokes=(), width=3, text=None, font_size=None, at=None):
    """A white-on-black uint8 [size, size] digit: polylines of `width` px, or `text` in a font,
    centred on its bounding box (as a drawing program would) unless placed `at` (x, y)."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    for line in strokes:
        draw.line([(x * size, y * size) for x, y in line], fill=255, width=width, joint="curve")
    if text is not None:
        font = _font(font_size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        xy = at or ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
        draw.text(xy, text, fill=255, font=font)
    return np.asarray(im)


SEVEN = [[(0.11, 0.14), (0.86, 0.14), (0.39, 0.89)]]
ONE = [[(0.40, 0.25), (0.55, 0.12), (0.55, 0.88)]]


def drawn_digits():
    """name -> (uint8 image, its digit): digits as a user draws them, not as MNIST stores them."""
    from PIL import Image, ImageDraw

    zero = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(zero).ellipse([5.6, 2.2, 22.4, 25.8], outline=255, width=3)
    small = np.zeros((28, 28), np.uint8)
    small[:14, :14] = _drawn(14, SEVEN, width=2)  # a small 7 in the top-left corner
    return {
        "7, 3-px strokes, full frame": (_drawn(28, SEVEN, 3), 7),
        "7, 1-px strokes": (_drawn(28, SEVEN, 1), 7),
        "7, 5-px strokes": (_drawn(28, SEVEN, 5), 7),
        "7, small, off-centre": (small, 7),
        "1, 3-px strokes": (_drawn(28, ONE, 3), 1),
        "0, 3-px strokes": (np.asarray(zero), 0),
        "7, font": (_drawn(28, text="7", font_size=30), 7),
        "2, font": (_drawn(28, text="2", font_size=30), 2),
        "3, font": (_drawn(28, text="3", font_size=30), 3),
        "7, 280 px, 30-px strokes": (_drawn(280, SEVEN, 30), 7),
    }


def test_digits_drawn_by_hand_are_fitted_by_auto_and_predicted_right(onnx_path, tmp_path, capsys):
    """A drawn 28x28 digit fills the frame or sits off-centre, unlike MNIST's 20x20 box centred by
    mass: `--fit auto` used to take every 28x28 image as it was (a 3-px '7' came out as 2)."""
    from PIL import Image

    digits = drawn_digits()
    names, labels = [], []
    for i, (name, (image, label)) in enumerate(digits.items()):
        names.append(str(tmp_path / f"drawn{i}.png"))
        labels.append(label)
        Image.fromarray(image).save(names[-1])
    rc, out, err = run_infer([str(onnx_path), *names, "--json"], capsys)  # --fit auto: the default
    assert rc == 0 and "warning" not in err, err
    got = [json.loads(line)["class"] for line in out.splitlines()]
    assert got == labels, dict(zip(digits, got))
    # As they are, most of the 28x28 ones are misread: the fit is what gets them right.
    rc, out, _ = run_infer([str(onnx_path), *names[:-1], "--json", "--fit", "none"], capsys)
    as_drawn = [json.loads(line)["class"] for line in out.splitlines()]
    assert sum(a != b for a, b in zip(as_drawn, labels)) >= 5, as_drawn
    for path in names:  # auto and mnist agree on every one of them
        assert np.array_equal(infer.load_image(path), infer.load_image(path, fit="mnist")), path


def test_mnist_digits_are_left_as_they_are_by_auto(onnx_path, sample, tmp_path):
    """The bundled sample's digits already sit as MNIST's do: `--fit auto` keeps every one of them."""
    from PIL import Image

    from l2fast.inputs import looks_like_mnist

    images = np.concatenate([sample.train_images, sample.test_images])
    assert all(looks_like_mnist(image) for image in images)
    for i, image in enumerate(sample.test_images[:50]):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        assert np.array_equal(infer.load_image(tmp_path / f"{i}.png"), image)
    for image, _ in drawn_digits().values():
        if image.shape == (28, 28):
            assert not looks_like_mnist(image)


def test_mnist_fit_centres_the_mass_where_mnist_does(onnx_path, sample):
    """MNIST's digits have their centre of mass within half a pixel of (14, 14); the fit put it at
    (13.5, 13.5), and 10% of the bundled test digits, fitted again, changed their prediction."""
    from l2fast.inputs import fit_mnist

    images = sample.test_images
    fitted = np.stack([fit_mnist(image) for image in images])
    w = fitted.astype(np.float64)
    cy = (w.sum(2) * np.arange(28)).sum(1) / w.sum((1, 2))
    cx = (w.sum(1) * np.arange(28)).sum(1) / w.sum((1, 2))
    assert np.abs(cy - 14).max() <= 0.5 and np.abs(cx - 14).max() <= 0.5
    p = infer.Predictor(onnx_path)
    changed = (p.predict(fitted).classes != p.predict(images).classes).mean()
    assert changed <= 0.01, changed
