"""FVQ's own checkpoints (--from fvq): both of its bridges against a functional re-implementation of
FVQ's code (fvq_reference.py), through conversion, the runtime and decoding."""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fvq_reference as fvq
import llamagen_reference as ref
from fullvq import checkpoint, interop
from fullvq.data import default_photos
from token_checks import assert_same_codes

ROOT = Path(__file__).resolve().parents[1]
K, DIM = 1024, 16       # a 32 x 32 code grid: 64 bridge tokens at patch 4, 16 at patch 8
AUTOENCODER = dict(ch=32, z_channels=32, codebook_size=K, codebook_dim=DIM)
CASES = [("QBridge-B/4", False), ("QBridge-L/8", False), ("QBridge-B/4-d4", False), ("QBridge-L/4", True)]
IDS = ["vit-B4", "vit-L8", "vit-B4-d4", "dit-L4"]


def photo_crops() -> np.ndarray:
    """(12, 64, 64, 3) uint8: two 64 px crops of each of six real photos."""
    crops = []
    for photo in default_photos()[:6]:
        a = np.asarray(photo.convert("RGB").resize((128, 128)))
        crops += [a[:64, :64], a[32:96, 64:]]
    return np.stack(crops)


def to_input(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1


def fvq_model(name: str, dit: bool, seed: int = 0, num_labels: int = 1) -> dict:
    """An FVQ VQModel state dict (LlamaGen's VQ-16 layout, small, plus the bridge), every weight
    random, its latents moved to the bridged codebook's range so that lookups choose many codes."""
    sd = ref.random_state_dict(ref.layout(**AUTOENCODER), seed=seed)
    sd.update(fvq.random_bridge(name, K, DIM, dit, seed=seed + 1, num_labels=num_labels))
    codes = fvq.codebook(sd, name)
    latents = ref.latents(sd, to_input(photo_crops())).permute(0, 2, 3, 1).reshape(-1, DIM)
    gain = codes.std(0) / latents.std(0)
    sd["quant_conv.weight"] = sd["quant_conv.weight"] * gain[:, None, None, None]
    sd["quant_conv.bias"] = (sd["quant_conv.bias"] - latents.mean(0)) * gain + codes.mean(0)
    return sd


def save_like_fvq(path: Path, sd: dict, name: str, dit: bool) -> Path:
    """As vq_train_qbridge_lr.py saves: the EMA beside other weights, optimisers, steps and its args."""
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    args = argparse.Namespace(vq_model="VQ-16", QB_type=name, codebook_size=K, codebook_embed_dim=DIM,
                              is_uncondition=dit, image_size=256)
    torch.save({"model": other, "ema": sd, "optimizer": {"state": {}, "param_groups": []},
                "discriminator": {"main.0.weight": torch.zeros(2)}, "optimizer_disc": {}, "steps": 400000,
                "args": args}, path)
    return path


@pytest.mark.parametrize("name,dit", CASES, ids=IDS)
def test_fvq_checkpoint_converts_exactly(tmp_path, name, dit):
    pytest.importorskip("onnxruntime")
    from fullvq.export import export
    from fullvq_rt import Tokenizer

    sd = fvq_model(name, dit)
    state = interop.convert(save_like_fvq(tmp_path / "fvq.pt", sd, name, dit), "fvq")  # no flag but --from fvq
    want_codes = fvq.codebook(sd, name)
    baked = state["model"]["quantize.embedding.weight"]
    torch.testing.assert_close(baked, want_codes, rtol=1e-5, atol=1e-5 * float(want_codes.abs().max()))
    origin = state["converted_from"]
    assert origin["weights"] == "'ema'" and "quantize.codebook_used" in origin["dropped"]
    assert origin["bridge"]["kind"] == ("DiT" if dit else "ViT") and origin["bridge"]["name"] == name
    assert origin["bridge"]["heads"] == 4

    crops = photo_crops()
    latents = ref.latents(sd, to_input(crops))
    want_quant, want = fvq.quantize(latents, want_codes)
    assert len(want.unique()) > 16  # the comparisons below are between real choices
    export(state, tmp_path / "fvq.engine", image_size=(64, 64))
    got = Tokenizer(tmp_path / "fvq.engine", backend="onnxruntime").encode(crops)
    assert_same_codes(got, want.numpy(), latents.permute(0, 2, 3, 1).reshape(-1, DIM).numpy(), want_codes.numpy())

    model, _ = checkpoint.model_from_state(state)
    with torch.no_grad():
        decoded = model.decode_codes(want, baked)
    assert (decoded - ref.decode(sd, want_quant)).abs().max() < 1e-4


def test_a_class_conditional_dit_bridge_uses_label_0(tmp_path):
    sd = fvq_model("QBridge-L/4", dit=True, num_labels=1001)  # 1000 classes + the dropped-label row
    torch.save({"model": sd}, tmp_path / "fvq.pt")
    state = interop.convert(tmp_path / "fvq.pt", "fvq")
    want = fvq.codebook(sd, "QBridge-L/4")
    torch.testing.assert_close(state["model"]["quantize.embedding.weight"], want, rtol=1e-5,
                               atol=1e-5 * float(want.abs().max()))
    assert state["converted_from"]["bridge"]["condition"] == "label 0 of 1001 label embeddings"
    assert "label 0 of 1001" in interop.describe(state)


def test_heads_are_not_in_the_shapes(tmp_path):
    """A bridge trained with 2 heads but stored under FVQ's names: the shapes alone give FVQ's 4 heads
    and another codebook; --bridge-heads 2 gives the right one, and the README says so."""
    sd = fvq_model("QBridge-B/4", dit=False)
    torch.save({"model": sd}, tmp_path / "two_heads.pt")
    want = fvq.codebook(sd, "QBridge-B/4", heads=2)
    default = interop.convert(tmp_path / "two_heads.pt", "fvq")["model"]["quantize.embedding.weight"]
    told = interop.convert(tmp_path / "two_heads.pt", "fvq", bridge_heads=2)["model"]["quantize.embedding.weight"]
    scale = float(want.abs().max())
    torch.testing.assert_close(told, want, rtol=1e-5, atol=1e-5 * scale)
    assert (default - want).abs().max() > 1e-3 * scale
    readme = (ROOT / "README.md").read_text()
    assert "--bridge-heads" in readme and "cannot be read off the shapes" in readme


def test_bad_fvq_files_say_what_they_hold(tmp_path):
    sd = fvq_model("QBridge-B/4", dit=False)
    wrong_name = save_like_fvq(tmp_path / "wrong.pt", sd, "QBridge-L/4", dit=False)
    with pytest.raises(ValueError, match="arguments name 'QBridge-L/4' \\(width 256.*tensors have width 128"):
        interop.convert(wrong_name, "fvq")
    linear = {k: v for k, v in sd.items() if not k.startswith(fvq.PREFIX)}
    linear[fvq.PREFIX + "linear.weight"], linear[fvq.PREFIX + "linear.bias"] = torch.eye(DIM), torch.zeros(DIM)
    torch.save({"model": linear}, tmp_path / "linear.pt")
    with pytest.raises(ValueError, match="FVQ's linear bridges.*unknown keys \\['linear.bias', 'linear.weight'\\]"):
        interop.convert(tmp_path / "linear.pt", "fvq")
    dit = fvq_model("QBridge-L/4", dit=True)
    del dit[fvq.PREFIX + "pos_embed"]
    torch.save({"model": dit}, tmp_path / "no_pos.pt")
    with pytest.raises(ValueError, match="missing keys \\['pos_embed'\\]"):
        interop.convert(tmp_path / "no_pos.pt", "fvq")
    torch.save({"model": sd}, tmp_path / "vit.pt")
    with pytest.raises(ValueError, match="holds an FVQ bridge.*--from fvq"):
        interop.convert(tmp_path / "vit.pt", "llamagen")


def test_export_command_takes_an_fvq_training_checkpoint(tmp_path):
    sd = fvq_model("QBridge-L/4", dit=True)
    path = save_like_fvq(tmp_path / "fvq.pt", sd, "QBridge-L/4", dit=True)
    done = subprocess.run([sys.executable, str(ROOT / "export/to_onnx.py"), str(path), "--from", "fvq", "-o",
                           str(tmp_path / "onnx"), "--image-size", "64", "64"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "FVQ DiT bridge baked (QBridge-L/4, width 256, depth 2, patch 4, 4 heads" in done.stdout
    codebook = np.load(tmp_path / "onnx" / "codebook.npy")
    want = fvq.codebook(sd, "QBridge-L/4").numpy()
    np.testing.assert_allclose(codebook, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_trainable_dit_bridge_starts_as_fvqs():
    """fullvq's kind="dit" bridge with FVQ's initialisation: the sin-cos positions of qbridge.py, every
    adaLN modulation and the head at zero (so the codebook starts at zero), the condition ~ N(0, 0.02)."""
    from fullvq.config import QuantizerConfig
    from fullvq.quantizers import build_quantizer

    torch.manual_seed(0)
    q = build_quantizer(QuantizerConfig(name="bridge", codebook_size=K, codebook_dim=DIM, bridge="L/4",
                                        bridge_kind="dit", bridge_init="fvq", bridge_head_init_std=0.0))
    b = q.bridge
    torch.testing.assert_close(b.pos_embed[0], fvq.sincos_pos_embed(256, 8), rtol=0, atol=1e-6)
    assert not b.pos_embed.requires_grad and "pos_embed" in b.state_dict()
    assert all(not m.modulation.weight.any() and not m.modulation.bias.any() for m in b.blocks)
    assert not b.final_modulation.weight.any() and float(b.condition.detach().std()) == pytest.approx(0.02, rel=0.2)
    assert not q.codebook().any()
