"""--preset fvq (FVQ's ImageNet recipe): its config, FVQ's exact 'lin' schedule, the ImageNet data
path (random_crop_arr of whole images, a separate validation folder), and checkpoints of fullvq 0.1."""

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fullvq import checkpoint
from fullvq.config import Config, preset
from fullvq.data import ResizedCrops, default_photos, list_images, random_crop_arr
from fullvq.models import build_model
from fullvq.schedule import lr_factor
from fullvq.trainer import resolve_run

FVQ = str(Path(__file__).resolve().parents[1] / "train" / "fvq.py")
IMAGENET_TRAIN = 1_281_167


@pytest.fixture(scope="module")
def imagenet_style(tmp_path_factory):
    """(train, val): class folders of JPEGs of real photos at ImageNet-like odd sizes, and a flat val folder."""
    root = tmp_path_factory.mktemp("imagenet")
    photos = default_photos()
    sizes = [(75, 50), (50, 90), (120, 80), (64, 64), (97, 71), (80, 120)]
    for i, (photo, size) in enumerate(zip(photos, sizes)):
        folder = root / "train" / f"n0{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        photo.resize(size).save(folder / f"img{i}.JPEG", quality=90)
    (root / "val").mkdir()
    for i, photo in enumerate(photos[6:9]):
        photo.resize((60, 45)).save(root / "val" / f"val{i}.JPEG", quality=90)
    return root / "train", root / "val"


def test_fvq_preset_is_fvqs_recipe():
    cfg = preset("fvq")
    assert cfg.model == preset("vq16").model and cfg.model.ch_mult == (1, 1, 2, 2, 4) and cfg.image_size == 256
    q = cfg.quantizer
    assert (q.name, q.codebook_size, q.codebook_dim, q.l2_norm, q.beta) == ("bridge", 16384, 256, False, 0.25)
    assert (q.bridge, q.bridge_kind, q.bridge_init, q.bridge_head_init_std, q.bridge_ln_eps) == (
        "auto", "dit", "fvq", 0.0, 1e-6)
    assert (cfg.lr, cfg.lr_base_batch, cfg.global_batch_size, cfg.epochs) == (1e-4, 128, 128, 40)
    assert (cfg.betas, cfg.weight_decay, cfg.grad_clip, cfg.ema_decay) == ((0.9, 0.95), 0.0, 1.0, 0.0)
    assert (cfg.schedule, cfg.warmup, cfg.decay_start, cfg.final_lr_ratio) == ("fvq", 0.1, 0.3, 0.01)
    loss = cfg.loss
    assert (loss.pixel, loss.pixel_weight, loss.perceptual_weight) == ("l2", 1.0, 1.0)
    assert (loss.disc_weight, loss.disc_start, loss.disc_lr) == (0.5, 19_999, 1e-4)
    assert (cfg.train_crops, cfg.val_crop) == ("resize", "center")
    # on 16 GPUs (FVQ-*.sh: 2 nodes x 8), ImageNet's train split: FVQ's len(loader) = 10,009 steps an epoch
    run = resolve_run(cfg, world=16, num_images=IMAGENET_TRAIN)
    assert run.batch_size == 8 and run.steps == 40 * 10_009 and run.quantizer.bridge == "L/4"
    for k, bridge in ((65536, "L/8"), (262144, "L/8")):
        cfg.quantizer.codebook_size = k
        assert resolve_run(cfg, 8, IMAGENET_TRAIN).quantizer.bridge == bridge
    cfg.quantizer.bridge = "B/4"  # --bridge wins
    assert resolve_run(cfg, 8, IMAGENET_TRAIN).quantizer.bridge == "B/4"
    assert Config.from_dict(asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="global_batch_size=128 does not split evenly over 3 processes"):
        resolve_run(cfg, 3, IMAGENET_TRAIN)
    with pytest.raises(ValueError, match="the 100 training images hold no whole batch of 128; pass --steps"):
        resolve_run(cfg, 1, 100)
    with pytest.raises(ValueError, match="train_crops='random': expected one of \\['split', 'resize'\\]"):
        resolve_run(Config(train_crops="random"), 1, 10)


def test_fvq_schedule_is_its_lin_lambda():
    """vq_train_qbridge_lr.py, sche_type 'lin', 1000 steps with 100 of warm-up: from 0.005 linearly to 1
    at step 100, 1 while (step - 100) / 899 < lrT = 0.3 (through step 369), then linearly to 0.01."""
    f = lambda step: lr_factor(step, 1000, "fvq", warmup=0.1, decay_start=0.3, final_ratio=0.01)
    assert f(0) == 0.005 and f(50) == pytest.approx(0.005 + 0.995 * 0.5) and f(99) == pytest.approx(0.99005)
    assert f(100) == f(369) == 1.0
    assert f(370) == pytest.approx(0.01 + 0.99 * (1 - 270 / 899) / 0.7) and f(370) < 1
    assert f(999) == pytest.approx(0.01)
    assert lr_factor(0, 10, "fvq", warmup=0.0, decay_start=0.3) == 1.0  # no warm-up (FVQ's default warmup_ep 0)


def test_random_crop_arr_draws_the_short_side_from_s_to_s_over_0_8():
    """A horizontal ramp tells the scale each crop was taken at: its short side goes to [S, ceil(S / 0.8)]."""
    ramp = np.tile(np.linspace(0, 255, 300)[None, :, None], (200, 1, 3)).astype(np.uint8)
    image, shorts = Image.fromarray(ramp), []
    for seed in range(30):
        crop = np.asarray(random_crop_arr(image, 64, torch.Generator().manual_seed(seed)), np.float64)[..., 0]
        assert crop.shape == (64, 64)
        width = 255 / np.polyfit(np.arange(64), crop[32], 1)[0]  # the resized image's width, from the slope
        shorts.append(width * 200 / 300)
    assert 64 * 0.97 <= min(shorts) and max(shorts) <= 80 * 1.03 and max(shorts) - min(shorts) > 8


def test_resized_crops_visit_every_image_once_per_epoch(imagenet_style):
    files = list_images(imagenet_style[0])
    crops = ResizedCrops(files, 32, seed=5)
    n = len(files)
    for epoch in range(3):
        assert sorted(crops.image_of(epoch * n + i) for i in range(n)) == list(range(n))
    assert [crops.image_of(i) for i in range(n)] != [crops.image_of(n + i) for i in range(n)]  # reshuffled
    again = ResizedCrops(files, 32, seed=5)
    assert torch.equal(crops[n + 3], again[n + 3]) and crops[3].shape == (3, 32, 32)
    assert crops[3].min() >= -1 and crops[3].max() <= 1
    assert not torch.equal(crops[3], ResizedCrops(files, 32, seed=6)[3])


def test_fvq_preset_trains_on_an_imagenet_style_folder(tmp_path, imagenet_style):
    train_dir, val_dir = imagenet_style
    run = subprocess.run(
        [sys.executable, FVQ, "--preset", "fvq", "--data", str(train_dir), "--val-data", str(val_dir), "--out",
         str(tmp_path / "run"), "--epochs", "2", "--global-batch-size", "4", "--image-size", "32",
         "--codebook-size", "1024", "model.ch=32", "loss.perceptual_weight=0", "eval_crops=4", "num_workers=2",
         "log_every=1"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    state = checkpoint.load(tmp_path / "run" / "ckpt.pt")
    cfg = state["config"]
    assert state["step"] == cfg["steps"] == 2 * (6 // 4)  # 6 images: one whole global batch per epoch
    assert cfg["quantizer"]["bridge"] == "L/4" and cfg["batch_size"] == 4
    assert state["disc_optimizer"]["state"][0]["step"] == 2  # the discriminator steps from the start, at weight 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    peak = 1e-4 * 4 / 128  # lr x global batch / 128
    assert [r["lr"] for r in log] == pytest.approx([peak * lr_factor(s, 2, "fvq", 0.1, 0.3, 0.01) for s in (0, 1)])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["num_tokens"] == 3 * 2 * 2  # centre crops of the val folder
    assert str(val_dir) in metrics["heldout"] and "center crops" in metrics["heldout"]


def test_a_missing_val_folder_fails_before_training(tmp_path):
    from fullvq.trainer import train

    cfg = preset("tiny")
    cfg.out, cfg.val_data = str(tmp_path / "run"), str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="--val-data .*nope' is not a folder"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_version_1_checkpoints_rebuild_the_bridge_they_were_trained_with(tmp_path):
    """fullvq 0.1 called a 128-wide, 2-head, eps-1e-5 bridge "XS/4"; its checkpoints still load as that."""
    cfg = preset("tiny")
    cfg.quantizer.codebook_size, cfg.quantizer.bridge, cfg.quantizer.bridge_ln_eps = 256, "W128-H2-D2/4", 1e-5
    model = build_model(cfg)
    old = asdict(cfg)
    old["quantizer"] = {k: v for k, v in old["quantizer"].items() if k not in ("bridge_init", "bridge_ln_eps")}
    old["quantizer"]["bridge"] = "XS/4"
    torch.save({"format": checkpoint.FORMAT, "version": 1, "config": old, "model": model.state_dict(), "step": 7},
               tmp_path / "old.pt")
    loaded, loaded_cfg = checkpoint.load_model(tmp_path / "old.pt")
    assert loaded_cfg.quantizer.bridge == "W128-H2-D2/4" and loaded_cfg.quantizer.bridge_ln_eps == 1e-5
    assert loaded.quantize.bridge.blocks[0].heads == 2 and loaded.quantize.bridge.norm.eps == 1e-5
    raw = model.quantize.raw.detach()
    assert torch.equal(loaded.quantize.bridge(raw), model.quantize.bridge.eval()(raw))
    assert math.isclose(loaded.quantize.bridge.blocks[0].norm1.eps, 1e-5)
