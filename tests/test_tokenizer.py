"""Export (ckpt.pt -> fvq.engine) and fullvq_rt.Tokenizer against the PyTorch model it came from."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fullvq_rt import EngineError, Tokenizer
from token_checks import assert_same_codes

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

EXPORT = Path(__file__).resolve().parents[1] / "export"


@pytest.fixture(scope="module")
def model(tiny_engine):
    from fullvq.checkpoint import load_model

    return load_model(tiny_engine[0])[0]


@pytest.fixture(scope="module")
def tiles():
    """(N, 16, 16, 3) uint8 tiles of real photos the model never saw."""
    from fullvq.data import default_photos

    out = []
    for photo in default_photos()[1:4]:
        a = np.asarray(photo.resize((128, 96)))
        out += [a[y:y + 16, x:x + 16] for y in range(0, 96, 16) for x in range(0, 128, 16)]
    return np.stack(out)


def torch_reference(model, batch):
    """PyTorch's own path: latents, then a full-distance argmin (float64, exact)."""
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).double()
    codes = model.quantize.bake().double()
    d = torch.cdist(z.reshape(-1, z.shape[-1]), codes) ** 2
    return d.argmin(1).reshape(z.shape[:3]).numpy(), d.numpy()


def test_encode_matches_pytorch(tiny_engine, model, tiles):
    tok = Tokenizer(tiny_engine[1], device="cpu")
    ids = tok.encode(tiles)
    want, d = torch_reference(model, tiles)
    assert ids.shape == (len(tiles), 4, 4) and ids.dtype == np.int32
    same = ids == want
    assert same.mean() >= 0.999, same.mean()
    rows = np.flatnonzero(~same.reshape(-1))  # the rest: float ties
    chosen, best = d[rows, ids.reshape(-1)[rows]], d[rows, want.reshape(-1)[rows]]
    assert np.all(chosen - best <= 1e-4 * (1 + best)), (chosen, best)


def test_decode_matches_pytorch(tiny_engine, model, tiles):
    tok = Tokenizer(tiny_engine[1], device="cpu")
    ids = tok.encode(tiles[:8])
    images = tok.decode(ids)
    codes = torch.from_numpy(tok.codebook.copy())
    with torch.no_grad():
        want = model.decode_codes(torch.from_numpy(ids).long(), codes)
    want = ((want.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).byte().numpy()
    assert images.shape == (8, 16, 16, 3) and images.dtype == np.uint8
    mse = np.mean((images.astype(float) - want) ** 2)
    assert mse == 0 or 10 * np.log10(255**2 / mse) >= 40
    assert np.array_equal(tok.decode(ids[0]), images[0])  # one grid -> one image


def test_input_forms_agree(tiny_engine, model, tiles, tmp_path):
    tok = Tokenizer(tiny_engine[1])
    Image.fromarray(tiles[0]).save(tmp_path / "a.png")
    batch = tok.encode(tiles[:3])
    x = torch.from_numpy(tiles[:3]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).numpy()  # (3, h, w, D)

    def agree(got, rows):  # one image at a time or batched: the same codes but for float ties
        assert_same_codes(got, batch[rows], z[rows].reshape(-1, z.shape[-1]), tok.codebook, max_flips=1 / 16)

    agree(tok.encode(tiles[0]), 0)
    agree(tok.encode(Image.fromarray(tiles[1])), 1)
    agree(tok.encode(tmp_path / "a.png"), 0)
    agree(tok.encode(str(tmp_path / "a.png")), 0)
    agree(tok.encode([tiles[2], Image.fromarray(tiles[0])]), [2, 0])
    gray = Image.fromarray(tiles[0]).convert("L")
    assert tok.encode(gray).shape == tok.grid  # other modes are converted to RGB
    assert tok.image_size == (16, 16) and tok.grid == (4, 4) and tok.codebook.shape == (1024, 8)


def test_bad_inputs_say_what_to_do(tiny_engine, tiles, tmp_path):
    tok = Tokenizer(tiny_engine[1])
    with pytest.raises(ValueError, match="is 32x16 .* takes 16x16: resize or crop"):
        tok.encode(np.zeros((32, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="must be uint8"):
        tok.encode(tiles[0].astype(np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        tok.encode(tiles[0][..., :2])
    with pytest.raises(ValueError, match="no images"):
        tok.encode([])
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        tok.encode(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"outside \[0, 1024\)"):
        tok.decode(np.full((4, 4), 1024))
    with pytest.raises(ValueError, match=r"outside \[0, 1024\)"):
        tok.decode(np.full((4, 4), -1))
    with pytest.raises(ValueError, match="must have shape"):
        tok.decode(np.zeros((5, 4), np.int32))
    with pytest.raises(ValueError, match="must be integers"):
        tok.decode(np.zeros((4, 4), np.float32))


def test_backend_and_device_choices(tiny_engine):
    tok = Tokenizer(tiny_engine[1], device="cpu", backend="onnxruntime", num_threads=1)
    assert tok.backend == "onnxruntime" and tok.device == "cpu" and "16x16" in repr(tok)
    with pytest.raises(EngineError, match="cannot use TensorRT: the bundle holds no TensorRT plans"):
        Tokenizer(tiny_engine[1], backend="tensorrt")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        Tokenizer(tiny_engine[1], device="gpu")
    with pytest.raises(ValueError, match="unknown backend"):
        Tokenizer(tiny_engine[1], backend="openvino")


def test_exported_graphs(tiny_engine):
    with zipfile.ZipFile(tiny_engine[1]) as z:
        for name, dims in (("encoder.onnx", 3), ("decoder.onnx", 8)):
            graph = onnx.load_from_string(z.read(name))
            assert graph.opset_import[0].version >= 17
            shape = graph.graph.input[0].type.tensor_type.shape.dim
            assert shape[0].dim_param and shape[1].dim_value == dims  # dynamic batch


def test_to_onnx_and_to_trt_command_lines(tiny_engine, tmp_path):
    ckpt = str(tiny_engine[0])
    result = subprocess.run([sys.executable, str(EXPORT / "to_onnx.py"), ckpt, "-o", str(tmp_path / "onnx")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in (tmp_path / "onnx").iterdir()} == {"encoder.onnx", "decoder.onnx", "codebook.npy"}
    bad = subprocess.run([sys.executable, str(EXPORT / "to_trt.py"), ckpt, "--batch", "8:1"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "expected MIN:OPT:MAX" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_require_trt_fails_clearly_without_tensorrt(tiny_engine, tmp_path):
    result = subprocess.run([sys.executable, str(EXPORT / "to_trt.py"), str(tiny_engine[0]), "-o",
                             str(tmp_path / "x.engine"), "--require-trt"], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "--require-trt" in result.stderr and "tensorrt" in result.stderr
    assert not (tmp_path / "x.engine").exists()


@pytest.mark.trt
def test_tensorrt_backend_matches_onnxruntime(tiny_engine, tiles, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fullvq.export import export

    export(tiny_engine[0], tmp_path / "trt.engine", precision="fp32", require_trt=True)
    trt_tok = Tokenizer(tmp_path / "trt.engine", device="cuda", backend="tensorrt")
    ort_tok = Tokenizer(tmp_path / "trt.engine", device="cpu")
    assert trt_tok.backend == "tensorrt"
    assert (trt_tok.encode(tiles) == ort_tok.encode(tiles)).mean() >= 0.999
