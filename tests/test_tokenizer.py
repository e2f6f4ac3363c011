"""Export (ckpt.pt -> fvq.engine) and fullvq_rt.Tokenizer against the PyTorch model it came from."""

import importlib.util
import json
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


def photo_crop(h: int, w: int, index: int = 1) -> np.ndarray:
    """(h, w, 3) uint8, the top-left of a real photo scaled to 2x the larger side."""
    from fullvq.data import default_photos

    side = 2 * max(h, w)
    return np.asarray(default_photos()[index].resize((side, side)))[:h, :w].copy()


def pytorch_codes_and_images(model, image: np.ndarray):
    """PyTorch's (latents (M, D), codes (h, w), decoded codes (H, W, 3) uint8) of one image."""
    x = torch.from_numpy(image[None]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        out = model.encode(x)
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, out.z_q.shape[1])
        decoded = model.decode_codes(out.indices, model.quantize.bake())
    decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).byte().numpy()[0]
    return z.numpy(), out.indices[0].numpy(), decoded


def assert_close_images(got: np.ndarray, want: np.ndarray) -> None:
    """Equal but for float rounding: PSNR >= 40 dB (0.5 of 255 levels rounding the other way)."""
    mse = np.mean((got.astype(float) - want) ** 2)
    assert got.shape == want.shape and (mse == 0 or 10 * np.log10(255**2 / mse) >= 40), (got.shape, want.shape, mse)


@pytest.mark.parametrize("tokens", [(1, 1), (8, 8), (16, 16), (12, 20)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_one_bundle_encodes_and_decodes_any_size_as_pytorch(tiny_engine, model, tokens):
    tok = Tokenizer(tiny_engine[1], device="cpu")
    assert tok.dynamic_size and tok.downsample == 4 and tok.image_size == (16, 16)
    image = photo_crop(4 * tokens[0], 4 * tokens[1])
    z, want, decoded = pytorch_codes_and_images(model, image)
    ids = tok.encode(image)
    assert ids.shape == tokens and ids.dtype == np.int32
    assert_same_codes(ids, want, z, tok.codebook)
    assert_close_images(tok.decode(want), decoded)


def test_exported_sizes_are_recorded(tiny_engine):
    manifest = json.loads(zipfile.ZipFile(tiny_engine[1]).read("manifest.json"))
    assert manifest["dynamic_size"] is True and manifest["downsample"] == 4
    assert manifest["checked_sizes"] == [[4, 4], [16, 16], [16, 32]] and "fixed_size_reason" not in manifest


def test_pad_round_trips_to_the_original_size(tiny_engine, model):
    tok = Tokenizer(tiny_engine[1], device="cpu")
    image = photo_crop(30, 17)
    ids = tok.encode(image, pad=True)
    assert ids.shape == (8, 5)  # 32 x 20 after padding
    padded = np.pad(image, ((0, 2), (0, 3), (0, 0)), mode="reflect")
    assert np.array_equal(ids, tok.encode(padded))
    back = tok.decode(ids, crop_to=(30, 17))
    assert back.shape == (30, 17, 3)
    assert np.array_equal(back, tok.decode(ids)[:30, :17])
    batch = tok.decode(np.stack([ids, ids]), crop_to=(30, 17))
    assert batch.shape == (2, 30, 17, 3) and np.array_equal(batch[1], back)


def test_sides_that_are_not_multiples_say_the_nearest_sizes(tiny_engine):
    tok = Tokenizer(tiny_engine[1], device="cpu")
    with pytest.raises(ValueError, match=r"image 0 is 30x17 .* multiples of 4 .* nearest valid sizes are 28x16 "
                                         r"\(crop\) and 32x20; .* pad=True"):
        tok.encode(np.zeros((30, 17, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image 1 is 3x8 .* sizes are 4x8;"):
        tok.encode([np.zeros((8, 8, 3), np.uint8), np.zeros((3, 8, 3), np.uint8)])
    assert tok.encode(np.zeros((3, 8, 3), np.uint8), pad=True).shape == (1, 2)


def test_lists_of_several_sizes_give_lists(tiny_engine):
    tok = Tokenizer(tiny_engine[1], device="cpu")
    images = [photo_crop(16, 16), photo_crop(32, 48, 2), photo_crop(16, 16, 3)]
    grids = tok.encode(images)
    assert isinstance(grids, list) and [g.shape for g in grids] == [(4, 4), (8, 12), (4, 4)]
    for image, grid in zip(images, grids, strict=True):  # batching by size changes nothing
        assert np.array_equal(grid, tok.encode(image))
    same = tok.encode([images[0], images[2]])
    assert isinstance(same, np.ndarray) and same.shape == (2, 4, 4)
    back = tok.decode(grids, crop_to=[(16, 16), (30, 45), (13, 14)])
    assert [b.shape for b in back] == [(16, 16, 3), (30, 45, 3), (13, 14, 3)]
    assert np.array_equal(back[1], tok.decode(grids[1])[:30, :45])
    assert [b.shape for b in tok.decode(grids)] == [(16, 16, 3), (32, 48, 3), (16, 16, 3)]


def test_bad_grids_and_crops_are_refused(tiny_engine):
    tok = Tokenizer(tiny_engine[1], device="cpu")
    for bad in (np.zeros((0, 4), np.int32), np.zeros(4, np.int32), np.zeros((1, 1, 4, 4), np.int32)):
        with pytest.raises(ValueError, match="must be an \\(h, w\\) grid"):
            tok.decode(bad)
    ids = np.zeros((4, 5), np.int32)
    for crop in ((17, 20), (16, 21), (12, 20), (20, 16)):
        with pytest.raises(ValueError, match=r"does not fit a 4x5 token grid: H must be in 13..16 and W in 17..20"):
            tok.decode(ids, crop_to=crop)
    with pytest.raises(ValueError, match="crop_to must be a pair"):
        tok.decode(ids, crop_to=16)
    with pytest.raises(ValueError, match="2 sizes for 3 grids"):
        tok.decode([ids, ids, ids], crop_to=[(16, 20), (16, 20)])


def test_a_fixed_size_bundle_takes_only_its_size(tmp_path):
    from bundle_factory import make_bundle

    make_bundle(tmp_path / "old.engine")  # written as before dynamic sizes: no dynamic_size field
    tok = Tokenizer(tmp_path / "old.engine", device="cpu")
    assert not tok.dynamic_size and "without dynamic sizes" in tok.fixed_size_reason
    assert tok.encode(np.zeros((16, 16, 3), np.uint8)).shape == (4, 4)
    assert tok.decode(np.zeros((2, 4, 4), np.int32)).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="is 32x16 .* takes only 16x16 .*without dynamic sizes.*: resize or crop"):
        tok.encode(np.zeros((32, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"must have shape \(4, 4\) .* takes only its export size"):
        tok.decode(np.zeros((8, 4), np.int32))


def test_a_network_tied_to_its_size_exports_fixed_and_says_why():
    from fullvq.export import export_networks

    class PositionalEncoder(torch.nn.Module):  # a learned embedding the size of a 16 x 16 image
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Parameter(torch.randn(1, 3, 16, 16))
            self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)

        def forward(self, x):
            return self.conv(x + self.pos)

    decoder = torch.nn.ConvTranspose2d(4, 3, 4, stride=4)
    codebook = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    graphs = export_networks(PositionalEncoder().eval(), decoder.eval(), 4, (16, 16), codebook)
    assert graphs.sizes["dynamic_size"] is False and graphs.sizes["checked_sizes"] == [[16, 16]]
    assert graphs.sizes["fixed_size_reason"].startswith("the network does not export for other sizes (ExportError: "
                                                        "encoder does not run at 4x4")
    assert max(graphs.parity.values()) < 1e-4


def test_bad_inputs_say_what_to_do(tiny_engine, tiles, tmp_path):
    tok = Tokenizer(tiny_engine[1])
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
    assert "images: any H x W that are multiples of 4 (checked at 4x4, 16x16, 16x32)" in result.stdout
    fixed = subprocess.run([sys.executable, str(EXPORT / "to_trt.py"), ckpt, "-o", str(tmp_path / "fixed.engine"),
                            "--fixed-size"], capture_output=True, text=True, timeout=600)
    assert fixed.returncode == 0 and "images: only 16x16: exported with --fixed-size" in fixed.stdout, fixed.stderr
    tok = Tokenizer(tmp_path / "fixed.engine", device="cpu")
    assert not tok.dynamic_size and tok.encode(np.zeros((16, 16, 3), np.uint8)).shape == (4, 4)
    with pytest.raises(ValueError, match="takes only 16x16 \\(exported with --fixed-size\\)"):
        tok.encode(np.zeros((16, 20, 3), np.uint8))
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
