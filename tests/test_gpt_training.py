"""The generator trainer (train/gpt.py): learning, bit-identical resume, weight-decay groups, checkpoints."""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from fullvq import checkpoint
from fullvq.codes import CodesDataset, write_codes
from fullvq.config import apply_override, preset
from fullvq.gpt_config import gpt_preset
from fullvq.gpt_trainer import param_groups, train
from fullvq.models.gpt import GPT, token_loss

GPT_CLI = str(Path(__file__).resolve().parents[1] / "train" / "gpt.py")
VOCAB, GRID, CLASSES = 16, (2, 3), 3


def write_pattern_codes(path, images=30, vocab=VOCAB):
    """Every image of class c has the same 2 x 3 grid (its mirror: the columns reversed): learnable exactly."""
    patterns = np.random.default_rng(0).integers(vocab, size=(CLASSES, *GRID))
    labels = np.arange(images) % CLASSES
    grids = np.stack([patterns[labels], patterns[labels][:, :, ::-1]], 1)  # (images, 2, h, w)
    meta = {"vocab_size": vocab, "grid": list(GRID), "num_classes": CLASSES, "class_names": ["a", "b", "c"],
            "image_size": 8, "flip": True, "tokenizer": "/runs/tok/ckpt.pt", "num_images": images, "skipped": {}}
    write_codes(path, grids.reshape(2 * images, -1), np.repeat(labels, 2), meta)
    return path


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return write_pattern_codes(tmp_path_factory.mktemp("codes") / "codes")


def small_config(out, codes, **over):
    cfg = gpt_preset("tiny")
    cfg.codes, cfg.out, cfg.steps, cfg.batch_size, cfg.log_every = str(codes), str(out), 4, 8, 2
    for assignment in ("model.dim=32", "model.n_layer=2", "model.n_head=2", *(f"{k}={v}" for k, v in over.items())):
        apply_override(cfg, assignment)
    return cfg


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_loss_falls_on_a_set_it_can_learn(tmp_path, codes):
    cfg = small_config(tmp_path / "run", codes, steps=200, log_every=20, lr=3e-3, schedule="constant", **{
        "model.class_dropout": 0, "model.token_dropout": 0, "model.resid_dropout": 0, "model.ffn_dropout": 0})
    metrics = train(cfg)
    log = read_log(cfg.out)
    assert [entry["step"] for entry in log] == list(range(20, 201, 20))
    # the first token of an image and of its mirror differ under one label: log(2) / 6 per token is the floor
    assert log[0]["loss"] > 1.5 and log[-1]["loss"] < 0.3 and log[-1]["accuracy"] > 0.9
    assert metrics["heldout_rows"] == 4 and metrics["heldout_loss"] < 0.1 * math.log(VOCAB)
    assert metrics["train_accuracy"] > 0.9 and metrics["step_time_s"] > 0
    assert json.loads((Path(cfg.out) / "metrics.json").read_text()) == metrics
    assert (cfg.vocab_size, cfg.grid, cfg.num_classes, cfg.tokenizer) == (VOCAB, GRID, CLASSES, "/runs/tok/ckpt.pt")


def test_resume_continues_bit_identically(tmp_path, codes):
    straight = small_config(tmp_path / "a", codes)  # dropouts on: their masks must repeat too
    train(straight)
    interrupted = small_config(tmp_path / "b", codes)
    assert train(interrupted, stop_at=2) is None
    assert checkpoint.load(Path(interrupted.out) / "ckpt.pt")["step"] == 2
    train(small_config(tmp_path / "b", codes), resume=True)
    a, b = (checkpoint.load(Path(run.out) / "ckpt.pt") for run in (straight, interrupted))
    assert a["step"] == b["step"] == 4 and a["kind"] == "gpt"
    assert {**a["config"], "out": ""} == {**b["config"], "out": ""}
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][i][k]) for k in state), i
    assert [e["step"] for e in read_log(interrupted.out)] == [2, 4]
    assert [e["loss"] for e in read_log(interrupted.out)] == [e["loss"] for e in read_log(straight.out)]


def test_weight_decay_only_on_matrices_and_embeddings():
    model = GPT(gpt_preset("tiny").model, VOCAB, GRID, CLASSES)
    decayed, plain = param_groups(model, 0.05)
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim < 2 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(names)
    assert {names[id(p)] for p in plain["params"]} == {n for n in names.values() if "norm" in n}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert {"tok_embeddings.weight", "class_embedding.weight", "output.weight"} <= decayed_names


def test_checkpoint_rebuilds_the_generator(tmp_path, codes):
    cfg = small_config(tmp_path / "run", codes)
    metrics = train(cfg)
    path = Path(cfg.out) / "ckpt.pt"
    model, loaded = checkpoint.load_gpt(path)
    assert loaded == cfg and not model.training
    groups = checkpoint.load(path)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [cfg.weight_decay, 0.0] and groups[0]["betas"] == (0.9, 0.95)
    data = CodesDataset(codes)
    tokens, labels = data.rows(data.heldout_rows)
    with torch.no_grad():  # the reloaded model reproduces the trainer's own held-out number
        assert float(token_loss(model(tokens, labels), tokens)) == pytest.approx(metrics["heldout_loss"], rel=1e-5)


def test_generator_and_tokenizer_checkpoints_are_not_confused(tmp_path, codes):
    cfg = small_config(tmp_path / "run", codes, steps=1)
    train(cfg)
    gpt = Path(cfg.out) / "ckpt.pt"
    with pytest.raises(ValueError, match="generator checkpoint .*load_gpt"):
        checkpoint.load_model(gpt)
    tokenizer = tmp_path / "tok.pt"
    checkpoint.save(tokenizer, {"config": asdict(preset("tiny")), "model": {}, "step": 0})
    with pytest.raises(ValueError, match="tok.pt' is a tokenizer checkpoint .*load_model"):
        checkpoint.load_gpt(tokenizer)
    (tmp_path / "tokenizer_run").mkdir()
    (tmp_path / "tokenizer_run" / "ckpt.pt").write_bytes(tokenizer.read_bytes())
    with pytest.raises(ValueError, match="tokenizer checkpoint"):
        train(small_config(tmp_path / "tokenizer_run", codes), resume=True)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, GPT_CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_cli_runs_resumes_and_says_what_it_needs(tmp_path, codes):
    bare = run_cli(cwd=tmp_path)
    assert bare.returncode != 0 and "python train/extract_codes.py" in bare.stderr and "--codes" in bare.stderr
    assert not (tmp_path / "runs").exists()
    small = ["model.dim=32", "model.n_layer=1", "model.n_head=2", "log_every=1"]
    first = run_cli("--codes", codes, "--out", tmp_path / "r", "--steps", 2, "--batch-size", 4, *small, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads(first.stdout)["steps"] == 2
    resumed = run_cli("--out", tmp_path / "r", "--resume", "--steps", 3, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    state = checkpoint.load(tmp_path / "r" / "ckpt.pt")
    assert state["step"] == 3 and state["config"]["model"]["n_layer"] == 1 and state["config"]["batch_size"] == 4
    other = write_pattern_codes(tmp_path / "other", vocab=32)
    mismatch = run_cli("--out", tmp_path / "r", "--resume", "--steps", 4, "--codes", other, cwd=tmp_path)
    assert mismatch.returncode != 0 and "vocab_size 16 in the run, 32 in the codes" in mismatch.stderr
    bad = run_cli("--codes", codes, "--out", tmp_path / "b", "learning_rate=1", cwd=tmp_path)
    assert bad.returncode != 0 and "unknown config key 'learning_rate'" in bad.stderr


def test_torchrun_two_processes(tmp_path, codes):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", GPT_CLI,
         "--codes", str(codes), "--out", str(tmp_path / "ddp"), "--steps", "3", "--batch-size", "4", "model.dim=32",
         "model.n_layer=1", "model.n_head=2", "log_every=1"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [e["step"] for e in read_log(tmp_path / "ddp")] == [1, 2, 3]  # only rank 0 writes
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    model, _ = checkpoint.load_gpt(tmp_path / "ddp" / "ckpt.pt")
    data = CodesDataset(codes)
    tokens, labels = data.rows(data.heldout_rows)
    with torch.no_grad():  # the held-out loss covers both ranks' halves of the held-out rows
        assert float(token_loss(model(tokens, labels), tokens)) == pytest.approx(metrics["heldout_loss"], rel=1e-5)
