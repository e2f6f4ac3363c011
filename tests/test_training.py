"""Schedule, config overrides, data, checkpoints and the training loop (tiny runs on CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fullvq import checkpoint
from fullvq.config import Config, apply_override, preset
from fullvq.data import TrainCrops, heldout_tiles, list_images, open_rgb
from fullvq.schedule import lr_factor
from fullvq.trainer import train

FVQ = str(Path(__file__).resolve().parents[1] / "train" / "fvq.py")


def test_anneal_schedule_key_steps():
    def f(step):
        return lr_factor(step, 1000, "anneal", warmup=0.1, decay_start=0.5, final_ratio=0.01)

    assert f(0) == pytest.approx(0.01) and f(49) == pytest.approx(0.5) and f(99) == 1.0
    assert f(100) == f(499) == 1.0
    assert f(749) == pytest.approx(1 - 0.99 * 249 / 499)
    assert f(999) == pytest.approx(0.01)


def test_cosine_and_constant_schedules():
    assert lr_factor(999, 1000, "cosine", warmup=0.1) == pytest.approx(0.01)
    assert lr_factor(550, 1000, "cosine", warmup=0.1, final_ratio=0.0) == pytest.approx(0.5, abs=0.01)
    assert lr_factor(999, 1000, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor(5, 10, "step")


def test_overrides_are_checked_against_the_config():
    cfg = preset("tiny")
    apply_override(cfg, "loss.perceptual_weight=0.5")
    apply_override(cfg, "model.ch_mult=1,2")
    apply_override(cfg, "bf16=false")
    assert cfg.loss.perceptual_weight == 0.5 and cfg.model.ch_mult == (1, 2) and cfg.bf16 is False
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'.*'lr'"):
        apply_override(cfg, "learning_rate=1")
    with pytest.raises(ValueError, match=r"steps='many': expected int"):
        apply_override(cfg, "steps=many")
    with pytest.raises(ValueError, match="unknown config section 'optim'"):
        apply_override(cfg, "optim.lr=1")


def test_config_round_trips_through_a_dict():
    from dataclasses import asdict

    cfg = preset("vq16")
    assert Config.from_dict(asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown Config keys.*another version"):
        Config.from_dict({**asdict(cfg), "frobnicate": 1})


def test_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: pass --data DIR"):
        list_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg.*remove or replace"):
        open_rgb(bad)


def test_crops_are_a_function_of_the_index(tmp_path):
    from fullvq.data import default_photos, split, to_tensor

    default_photos()[0].resize((80, 40)).save(tmp_path / "a.png")  # a real photo: position and flip show
    default_photos()[1].resize((20, 10)).save(tmp_path / "small.png")  # smaller than a crop: enlarged
    files = list_images(tmp_path)
    a, b, other = TrainCrops(files, 16, seed=3), TrainCrops(files, 16, seed=3), TrainCrops(files, 16, seed=4)
    crops = [a[i] for i in range(24)]
    assert all(torch.equal(crop, b[i]) for i, crop in enumerate(crops))  # a function of (seed, index) alone
    assert len({crop.numpy().tobytes() for crop in crops}) >= 20  # indices draw different windows and flips
    assert sum(torch.equal(crop, other[i]) for i, crop in enumerate(crops)) <= 2  # and so do seeds
    windows = []  # every 16 x 16 window of each image's training region, as it is and mirrored
    for file in files:
        region = to_tensor(split(Image.open(file).convert("RGB"), 16)[0])
        for y in range(region.shape[1] - 15):
            for x in range(region.shape[2] - 15):
                windows += [region[:, y:y + 16, x:x + 16], region[:, y:y + 16, x:x + 16].flip(2)]
    assert all(any(torch.equal(crop, w) for w in windows) for crop in crops)
    flipped = [i for i, crop in enumerate(crops) if not any(torch.equal(crop, w) for w in windows[0::2])]
    assert 0 < len(flipped) < len(crops)  # some crops are mirrored, not all
    tiles = heldout_tiles(files, 16)
    assert tiles.shape[1:] == (3, 16, 16) and tiles.min() >= -1 and tiles.max() <= 1


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Two small real photos, so that runs and their evaluation stay fast."""
    from fullvq.data import default_photos

    folder = tmp_path_factory.mktemp("photos")
    for i, photo in enumerate(default_photos()[:2]):
        photo.resize((64, 48)).save(folder / f"{i}.png")
    return folder


def small_config(tmp_path, data, **over) -> Config:
    cfg = preset("tiny")
    cfg.out, cfg.steps, cfg.batch_size, cfg.image_size, cfg.log_every = str(tmp_path / "run"), 4, 4, 16, 2
    cfg.data = str(data)
    cfg.quantizer.codebook_size, cfg.quantizer.bridge, cfg.eval_crops = 256, "XS/4", 8
    for k, v in over.items():
        apply_override(cfg, f"{k}={v}")
    return cfg


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_resume_continues_bit_identically(tmp_path, photo_dir, ema_decay):
    straight = small_config(tmp_path / "a", photo_dir, ema_decay=ema_decay)
    train(straight)
    interrupted = small_config(tmp_path / "b", photo_dir, ema_decay=ema_decay)
    assert train(interrupted, stop_at=2) is None
    assert checkpoint.load(Path(interrupted.out) / "ckpt.pt")["step"] == 2
    train(interrupted, resume=True)
    a = checkpoint.load(Path(straight.out) / "ckpt.pt")
    b = checkpoint.load(Path(interrupted.out) / "ckpt.pt")
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert ("ema" in a) == (ema_decay > 0)
    steps = [json.loads(line)["step"] for line in (Path(interrupted.out) / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    train(interrupted)  # a new run in the same folder starts a new log
    steps = [json.loads(line)["step"] for line in (Path(interrupted.out) / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    for key in a.get("ema", {}):
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_lc_run_resumes_from_a_config_built_anew(tmp_path, photo_dir):
    """train/study.py resumes with the planned config, whose lc feature width is not yet measured: the
    checkpoint's frozen centres set it, and the run ends as if never interrupted."""
    codebook = tmp_path / "lc.pt"
    torch.save({"format": "fullvq-lc-codebook", "version": 1, "codebook": torch.randn(256, 24)}, codebook)

    def config(name):
        return small_config(tmp_path / name, photo_dir, **{"quantizer.name": "lc", "quantizer.lc_codebook": codebook})

    train(config("straight"))
    assert train(config("resumed"), stop_at=2) is None
    resumed = config("resumed")
    assert resumed.quantizer.lc_feature_dim == 0
    train(resumed, resume=True)
    a, b = (checkpoint.load(tmp_path / name / "run" / "ckpt.pt") for name in ("straight", "resumed"))
    assert b["model"]["quantize.frozen"].shape == (256, 24)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_bridge_raw_lr_scale_sets_the_raw_codes_own_learning_rate(tmp_path, photo_dir):
    from fullvq.models import build_model
    from fullvq.trainer import param_groups

    cfg = small_config(tmp_path, photo_dir)
    model = build_model(cfg)
    assert [len(g["params"]) for g in param_groups(model, cfg)] == [len(list(model.parameters()))]  # FVQ's one group
    cfg.quantizer.bridge_lr_scale = 2.0
    groups = {g["lr_scale"]: g["params"] for g in param_groups(model, cfg)}
    assert len(groups[2.0]) == len(list(model.quantize.bridge.parameters())) and len(groups[1.0]) > 1  # raw codes: 1
    residual = build_model(small_config(tmp_path, photo_dir, **{"quantizer.residual_depth": 2}))
    groups = {g["lr_scale"]: g["params"] for g in param_groups(residual, cfg)}  # each stage's bridge
    assert len(groups[2.0]) == sum(len(list(s.bridge.parameters())) for s in residual.quantize.stages)
    cfg.quantizer.bridge_lr_scale = 1.0
    cfg.quantizer.bridge_raw_lr_scale = 0.0  # raw codes frozen: only the bridge and the rest learn
    assert train(cfg, stop_at=2) is None
    train(cfg, resume=True)  # the scale outlives the checkpoint, whose optimizer groups do not hold it
    torch.manual_seed(cfg.seed)  # as the trainer builds it
    before, after = build_model(cfg).state_dict(), checkpoint.load(Path(cfg.out) / "ckpt.pt")["model"]
    assert torch.equal(after["quantize.raw"], before["quantize.raw"])
    assert not torch.equal(after["quantize.bridge.head.weight"], before["quantize.bridge.head.weight"])


def test_evaluation_resumed_after_the_last_step_reports_no_step_time(tmp_path, photo_dir):
    from fullvq.metrics import steady_step_time

    cfg = small_config(tmp_path, photo_dir, steps=2)
    assert train(cfg)["step_time_s"] > 0
    again = train(cfg, resume=True)  # trained already: only the final evaluation runs, no step is timed
    assert again["step_time_s"] is None and again["usage_train"] is not None
    assert steady_step_time([9.0, 1.0, 3.0]) == 2.0 and steady_step_time([]) is None


def test_load_model_prefers_the_weight_ema(tmp_path, photo_dir):
    cfg = small_config(tmp_path, photo_dir, ema_decay=0.5)
    train(cfg)
    path = Path(cfg.out) / "ckpt.pt"
    state = checkpoint.load(path)
    averaged, _ = checkpoint.load_model(path)
    trained, _ = checkpoint.load_model(path, ema=False)
    key = "encoder.conv_in.weight"
    assert torch.equal(averaged.state_dict()[key], state["ema"]["module." + key])
    assert torch.equal(trained.state_dict()[key], state["model"][key])
    assert not torch.equal(averaged.state_dict()[key], trained.state_dict()[key])


def test_checkpoint_rebuilds_the_model_alone(tmp_path, photo_dir):
    cfg = small_config(tmp_path, photo_dir, **{"quantizer.name": "vq"})
    metrics = train(cfg)
    out = Path(cfg.out)
    written = json.loads((out / "metrics.json").read_text())
    assert {"usage", "psnr", "num_tokens", "usage_train", "step_time_s"} <= set(written)
    assert metrics["num_tokens"] > 0 and (out / "reconstructions.png").is_file()
    model, loaded_cfg = checkpoint.load_model(out / "ckpt.pt")
    assert loaded_cfg == cfg and model.quantize.bake().shape == (256, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, q = model(x)
    assert recon.shape == x.shape and q.indices.shape == (2, 4, 4)


def test_usage_train_is_reported_at_two_densities(tmp_path, photo_dir):
    cfg = small_config(tmp_path, photo_dir, eval_crops=0, eval_tokens_per_code=50)
    metrics = train(cfg)
    curve = metrics["usage_train_by_density"]
    assert all(0 <= c["dead_positions"] <= 16 for c in curve)  # a bridge's 4 x 4 patch positions
    assert all("dead_positions" in json.loads(line) for line in (Path(cfg.out) / "log.jsonl").open())
    assert [c["tokens_per_code"] for c in curve] == [10, 50] and [c["num_tokens"] for c in curve] == [2560, 12800]
    assert curve[0]["usage"] <= curve[1]["usage"] == metrics["usage_train"]  # more tokens never lose a code
    assert metrics["num_tokens_train"] == 12800


def test_checkpoint_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    torch.save({"format": "fullvq-checkpoint", "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="version 99 fullvq checkpoint"):
        checkpoint.load(tmp_path / "future.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fullvq checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_residual_vq_trains_counts_usage_per_stage_and_refuses_export(tmp_path, photo_dir):
    from fullvq.export import ExportError, export

    cfg = small_config(tmp_path, photo_dir, **{"quantizer.name": "vq", "quantizer.residual_depth": 2})
    metrics = train(cfg)
    state = checkpoint.load(Path(cfg.out) / "ckpt.pt")
    model, _ = checkpoint.model_from_state(state)
    assert model.quantize.bake().shape == (2, 256, cfg.quantizer.codebook_dim)
    # usage over (stage, code) pairs: 8 crops of 4x4 tokens give at most 128 of each stage's 256 codes
    assert 0 < metrics["usage_train"] <= 128 / 256 and metrics["num_tokens_train"] == 8 * 16
    with pytest.raises(ExportError, match=r"residual quantizers \(residual_depth=2\) cannot be exported yet"):
        export(Path(cfg.out) / "ckpt.pt", tmp_path / "rvq.engine")


def run_cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, FVQ, *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_resume_uses_the_runs_own_config(tmp_path, photo_dir):
    args = ["--data", str(photo_dir), "--out", str(tmp_path / "r"), "--image-size", "16", "--batch-size", "2",
            "--codebook-size", "256", "--quantizer", "vq", "eval_crops=4"]
    assert run_cli(*args, "--steps", "2", cwd=tmp_path).returncode == 0
    resumed = run_cli("--out", str(tmp_path / "r"), "--resume", "--steps", "3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = checkpoint.load(tmp_path / "r" / "ckpt.pt")
    assert state["step"] == 3 and state["config"]["quantizer"]["name"] == "vq"
    missing = run_cli("--out", str(tmp_path / "none"), "--resume", cwd=tmp_path)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_cli_reports_bad_settings(tmp_path, photo_dir):
    for args, message in [(["--data", str(tmp_path / "missing")], "does not exist"),
                          (["--data", str(photo_dir), "--codebook-size", "1000"], "not a perfect square"),
                          (["no_such_key=1"], "unknown config key 'no_such_key'")]:
        result = run_cli("--steps", "1", "--out", str(tmp_path / "r"), *args, cwd=tmp_path)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, photo_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", FVQ,
         "--steps", "3", "--batch-size", "2", "--image-size", "16", "--codebook-size", "256", "--bridge", "XS/4",
         "--data", str(photo_dir), "--out", str(tmp_path / "ddp"), "eval_crops=8", "log_every=1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["num_tokens_train"] == 8 * 16  # both ranks' crops were counted
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3  # only rank 0 writes
