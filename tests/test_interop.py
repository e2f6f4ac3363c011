"""Published LlamaGen checkpoints: key mapping, numerical identity with LlamaGen's VQModel, metric
detection, bad files, and the commands that take --from (FVQ's files: test_fvq_interop.py)."""

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llamagen_reference as ref
from fullvq import checkpoint, interop
from token_checks import assert_same_codes

ROOT = Path(__file__).resolve().parents[1]
VQ16, VQ8 = (1, 1, 2, 2, 4), (1, 2, 2, 4)
SMALL = dict(ch=32, z_channels=32, codebook_size=256, codebook_dim=8)  # the narrowest width GroupNorm(32) allows


def llamagen_weights(ch_mult=VQ16, unit_norm=False, seed=0, shape=SMALL, probe_size=64) -> dict:
    """A LlamaGen VQModel state dict whose codes are perturbed latents of random images, so that
    the nearest-code choice is not trivial."""
    sd = ref.random_state_dict(ref.layout(ch_mult=ch_mult, **shape), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    latents = ref.latents(sd, torch.rand(4, 3, probe_size, probe_size, generator=g) * 2 - 1)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, shape["codebook_dim"])
    codes = flat[torch.randint(len(flat), (shape["codebook_size"],), generator=g)]
    codes = codes + 0.3 * codes.std() * torch.randn(codes.shape, generator=g)
    sd["quantize.embedding.weight"] = F.normalize(codes, dim=1) if unit_norm else codes
    return sd


def lookup_space(sd: dict, image: torch.Tensor, unit_norm: bool) -> tuple[np.ndarray, np.ndarray]:
    """(latents (M, D), codebook (K, D)) as LlamaGen's quantizer compares them (l2-normalised for cosine)."""
    z = ref.latents(sd, image).permute(0, 2, 3, 1).reshape(-1, sd["quant_conv.weight"].shape[0])
    codes = sd["quantize.embedding.weight"]
    if unit_norm:
        z, codes = F.normalize(z, dim=1), F.normalize(codes, dim=1)
    return z.numpy(), codes.numpy()


def assert_same_as_llamagen(sd: dict, state: dict, image: torch.Tensor, unit_norm: bool) -> None:
    """fullvq's model of `state` encodes `image` to LlamaGen's indices (but for float ties) and decodes
    LlamaGen's codes within 1e-4."""
    model, _ = checkpoint.model_from_state(state)
    want_quant, want_indices = ref.encode(sd, image, l2_norm=unit_norm)
    with torch.no_grad():
        out = model.encode(image)
        reconstruction = model.decode_codes(want_indices, model.quantize.bake())
    assert_same_codes(out.indices.numpy(), want_indices.numpy(), *lookup_space(sd, image, unit_norm))
    assert len(want_indices.unique()) > 8  # the check compares real choices, not one code everywhere
    same = (out.indices == want_indices).unsqueeze(1).expand_as(out.z_q)
    assert (out.z_q - want_quant)[same].abs().max() < 1e-5
    assert (reconstruction - ref.decode(sd, want_quant)).abs().max() < 1e-4


def save(tmp_path, obj, name="published.pt") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("ch_mult", [VQ16, VQ8], ids=["vq16", "vq8"])
@pytest.mark.parametrize("unit_norm", [False, True], ids=["l2", "cosine"])
def test_llamagen_weights_encode_and_decode_exactly_as_llamagen(tmp_path, ch_mult, unit_norm):
    sd = llamagen_weights(ch_mult, unit_norm)
    path = save(tmp_path, {"model": sd, "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")})
    state = interop.convert(path, "llamagen")
    cfg = state["config"]
    assert cfg["model"]["ch"] == 32 and tuple(cfg["model"]["ch_mult"]) == ch_mult
    assert cfg["model"]["num_res_blocks"] == 2 and cfg["model"]["z_channels"] == 32
    assert (cfg["quantizer"]["codebook_size"], cfg["quantizer"]["codebook_dim"]) == (256, 8)
    assert state["converted_from"]["metric"] == ("cosine" if unit_norm else "l2")
    assert state["converted_from"]["dropped"] == ["quantize.codebook_used"]
    image = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    assert_same_as_llamagen(sd, state, image, unit_norm)


@pytest.mark.slow
def test_full_size_vq16_at_256_px_matches_llamagen(tmp_path):
    full = dict(ch=128, z_channels=256, codebook_size=16384, codebook_dim=8)  # LlamaGen's VQ-16, 72M weights
    sd = llamagen_weights(unit_norm=True, shape=full, probe_size=256)
    state = interop.convert(save(tmp_path, {"model": sd}), "llamagen")
    image = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(7)) * 2 - 1
    assert_same_as_llamagen(sd, state, image, unit_norm=True)


def test_metric_is_detected_from_the_codebook_and_can_be_overridden():
    codes = torch.randn(64, 8)
    assert interop.detect_metric(F.normalize(codes, dim=1))[0] == "cosine"
    metric, why = interop.detect_metric(codes)
    assert metric == "l2" and "--metric cosine" in why
    assert interop.detect_metric(F.normalize(codes, dim=1) * 1.01)[0] == "l2"
    assert interop.detect_metric(codes, "cosine") == ("cosine", "--metric cosine (codebook rows are not all of unit norm)")
    with pytest.raises(ValueError, match="unknown metric 'dot'"):
        interop.detect_metric(codes, "dot")


def test_metric_override_changes_the_codes_chosen(tmp_path):
    path = save(tmp_path, {"model": llamagen_weights()})
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    indices = {}
    for metric in ("l2", "cosine"):
        state = interop.convert(path, "llamagen", metric=metric)
        assert state["config"]["quantizer"]["l2_norm"] == (metric == "cosine")
        with torch.no_grad():
            indices[metric] = checkpoint.model_from_state(state)[0].encode(image).indices
    sd = torch.load(path)["model"]
    assert_same_codes(indices["cosine"].numpy(), ref.encode(sd, image, l2_norm=True)[1].numpy(),
                      *lookup_space(sd, image, unit_norm=True))
    assert (indices["l2"] != indices["cosine"]).float().mean() > 0.1


def test_weights_are_found_where_llamagen_puts_them(tmp_path):
    sd = llamagen_weights()
    other = llamagen_weights(seed=5)
    key = "decoder.conv_out.bias"
    # EMA first, as LlamaGen's scripts read; DDP's "module." prefix removed; a bare state dict too
    state = interop.convert(save(tmp_path, {"model": other, "ema": sd}), "llamagen")
    assert state["converted_from"]["weights"] == "'ema'" and torch.equal(state["model"][key], sd[key])
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    assert torch.equal(interop.convert(save(tmp_path, wrapped), "llamagen")["model"][key], sd[key])
    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    bare = interop.convert(save(tmp_path, half), "llamagen")
    assert bare["converted_from"]["weights"] == "top level" and bare["model"][key].dtype == torch.float32


def test_bad_files_fail_with_what_to_do(tmp_path, tiny_engine):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        interop.convert(tmp_path / "nope.pt", "llamagen")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(save(tmp_path, {"model": llamagen_weights()}).read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot read .*Is the file complete"):
        interop.convert(truncated, "llamagen")
    with pytest.raises(ValueError, match="already a fullvq checkpoint: leave out --from"):
        interop.convert(tiny_engine[0], "llamagen")
    with pytest.raises(ValueError, match="no state dict of tensors.*found \\['notes'\\]"):
        interop.convert(save(tmp_path, {"notes": "hello"}), "llamagen")
    with pytest.raises(ValueError, match="expected one of \\['llamagen', 'fvq'\\]"):
        interop.convert(tmp_path / "x.pt", "taming")
    with pytest.raises(ValueError, match="--metric and --bridge-heads apply to converted"):
        interop.read_checkpoint(tiny_engine[0], "fullvq", metric="l2")


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path):
    sd = llamagen_weights()
    del sd["encoder.mid.1.q.bias"]
    sd["encoder.mid.1.extra.weight"] = torch.zeros(3)
    sd["decoder.norm_out.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as e:
        interop.convert(save(tmp_path, {"model": sd}), "llamagen")
    message = str(e.value)
    assert "1 missing keys: ['encoder.mid.1.q.bias']" in message
    assert "1 unexpected keys: ['encoder.mid.1.extra.weight']" in message
    assert "1 keys of another shape: ['decoder.norm_out.bias']" in message
    with pytest.raises(ValueError, match="missing 'quant_conv.weight': this is not a LlamaGen VQModel"):
        interop.convert(save(tmp_path, {"model": {"quantize.embedding.weight": torch.zeros(4, 2),
                                                  "encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}}), "llamagen")


def test_encoder_and_decoder_of_different_widths_are_refused(tmp_path):
    sd = ref.random_state_dict(ref.layout(ch_mult=VQ8, **SMALL))
    decoder = ref.random_state_dict(ref.layout(ch_mult=(1, 1, 2, 4), **SMALL))
    sd.update({k: v for k, v in decoder.items() if k.startswith("decoder.")})
    with pytest.raises(ValueError, match="one ch_mult"):
        interop.convert(save(tmp_path, {"model": sd}), "llamagen")


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_export_from_llamagen_runs_in_the_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    import fullvq_rt

    sd = llamagen_weights(unit_norm=True)
    path = save(tmp_path, {"model": sd})
    done = run("export/to_trt.py", path, "--from", "llamagen", "-o", tmp_path / "lg.engine", "--image-size", 64, 64,
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "converted llamagen weights from 'model'" in done.stdout and "metric cosine" in done.stdout
    manifest = json.loads(zipfile.ZipFile(tmp_path / "lg.engine").read("manifest.json"))
    assert manifest["metric"] == "cosine" and manifest["built_by"]["converted_from"]["format"] == "llamagen"
    assert manifest["dynamic_size"] is True and manifest["checked_sizes"] == [[16, 16], [64, 64], [64, 128]]
    tok = fullvq_rt.Tokenizer(tmp_path / "lg.engine", backend="onnxruntime")
    for h, w in ((64, 64), (16, 16), (128, 128), (192, 320)):  # the export size, 1, 8x8 and 12x20 tokens
        images = np.random.default_rng(h + w).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        tokens = tok.encode(images)
        assert tokens.shape == (2, h // 16, w // 16)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        quant, want = ref.encode(sd, x, l2_norm=True)
        assert_same_codes(tokens, want.numpy(), *lookup_space(sd, x, unit_norm=True))
        decoded = ((ref.decode(sd, quant).clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
        assert np.abs(tok.decode(want.numpy()).astype(float) - decoded).max() <= 1  # float rounding at .5


def test_converted_file_is_an_ordinary_checkpoint_that_fine_tunes(tmp_path):
    path = save(tmp_path, {"model": llamagen_weights()})
    converted = run("train/convert.py", path, "--from", "llamagen", "-o", tmp_path / "run" / "ckpt.pt",
                    "--image-size", 64, cwd=tmp_path)
    assert converted.returncode == 0, converted.stderr
    state = checkpoint.load(tmp_path / "run" / "ckpt.pt")
    assert state["step"] == 0 and state["config"]["out"] == str(tmp_path / "run")
    tuned = run("train/fvq.py", "--resume", "--out", tmp_path / "run", "--steps", 2, "--batch-size", 2,
                "loss.perceptual_weight=0", "eval_crops=2", "num_workers=0", cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr
    after = checkpoint.load(tmp_path / "run" / "ckpt.pt")
    assert after["step"] == 2 and "optimizer" in after and "ema" in after
    moved = after["model"]["decoder.conv_out.weight"] - state["model"]["decoder.conv_out.weight"]
    assert moved.abs().max() > 0
    refused = run("train/convert.py", path, cwd=tmp_path)
    assert refused.returncode != 0 and "--from llamagen or --from fvq" in refused.stderr


def test_evaluate_from_llamagen(tmp_path):
    from PIL import Image

    path = save(tmp_path, {"model": llamagen_weights()})
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.png")
    done = run("train/evaluate.py", path, "--from", "llamagen", "--data", tmp_path / "images", "--no-fid",
               "--lpips-net", "none", "--json", tmp_path / "eval.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["converted_from"]["format"] == "llamagen" and result["num_tokens"] == 2 * 16 * 16
    bad = run("train/evaluate.py", path, "--data", tmp_path / "images", cwd=tmp_path)
    assert bad.returncode != 0 and "not a fullvq checkpoint" in bad.stderr
