"""Codes folders: extraction from class folders and from the default photos, one process or two, and
read_codes's checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fullvq import checkpoint
from fullvq.codes import CodesDataset, read_codes, write_codes
from token_checks import assert_same_codes

EXTRACT = str(Path(__file__).resolve().parents[1] / "train" / "extract_codes.py")


def extract(*args):
    sys.path.insert(0, str(Path(EXTRACT).parent))
    try:
        import extract_codes
    finally:
        sys.path.pop(0)
    return extract_codes.main([str(a) for a in args])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny tokenizer checkpoint: 16 px images, 4 x 4 tokens, K = 256, a few steps on one photo."""
    from fullvq.config import preset
    from fullvq.data import default_photos
    from fullvq.trainer import train

    root = tmp_path_factory.mktemp("tokenizer")
    (root / "photos").mkdir()
    default_photos()[0].resize((64, 64)).save(root / "photos" / "astronaut.png")
    cfg = preset("tiny")
    cfg.out, cfg.data, cfg.steps, cfg.batch_size, cfg.image_size = str(root / "run"), str(root / "photos"), 6, 4, 16
    cfg.quantizer.codebook_size, cfg.quantizer.bridge, cfg.eval_crops = 256, "XS/4", 4
    train(cfg)
    return root / "run" / "ckpt.pt"


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """cat: 2 readable images (one in a subfolder); dog: 1 readable (grayscale), 1 corrupt, 1 smaller than
    16 px (enlarged, as LlamaGen's center_crop_arr does)."""
    from fullvq.data import default_photos

    root = tmp_path_factory.mktemp("classes")
    photos = default_photos()
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir()
    photos[1].resize((40, 24)).save(root / "cat" / "a.png")
    photos[2].resize((24, 30)).save(root / "cat" / "sub" / "b.jpg")
    photos[3].resize((20, 20)).convert("L").save(root / "dog" / "c.png")
    (root / "dog" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    photos[4].resize((12, 30)).save(root / "dog" / "small.png")
    return root, [root / "cat" / "a.png", root / "cat" / "sub" / "b.jpg", root / "dog" / "c.png",
                  root / "dog" / "small.png"]


def latents(model, x: torch.Tensor) -> np.ndarray:
    """(b, 3, S, S) in [-1, 1] -> the latents (b * h * w, D) the codes are looked up for."""
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x))
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy()


def reference_codes(model, file: Path, size: int, mirror: bool) -> tuple[np.ndarray, np.ndarray]:
    """(the token grid of a file's center square after resizing its short side to `size`, by PIL
    alone; its latents)."""
    image = Image.open(file).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    if mirror:
        image = ImageOps.mirror(image)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model.encode(x).indices.flatten().numpy(), latents(model, x)


def test_extract_class_folders(tokenizer, class_folders, tmp_path):
    root, readable = class_folders
    out = tmp_path / "codes"
    extract(tokenizer, "--data", root, "--out", out, "--batch-size", 2)
    codes, labels, meta = read_codes(out)
    assert codes.shape == (8, 16) and codes.dtype == np.int32 and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert meta["class_names"] == ["cat", "dog"] and meta["num_classes"] == 2 and meta["num_images"] == 4
    assert meta["vocab_size"] == 256 and meta["grid"] == [4, 4] and meta["image_size"] == 16 and meta["flip"]
    assert meta["tokenizer"] == str(tokenizer.resolve())
    assert [Path(f).name for f in meta["skipped"]] == ["corrupt.jpg"]
    assert meta["upscaled"] == [str(root / "dog" / "small.png")]
    model, _ = checkpoint.load_model(tokenizer)
    codebook = model.quantize.bake().numpy()
    for i, file in enumerate(readable):
        for mirror in (False, True):
            want, z = reference_codes(model, file, 16, mirror)
            assert_same_codes(codes[2 * i + mirror], want, z, codebook, max_flips=1 / 16)  # batched apart: float ties
    assert len({row.tobytes() for row in codes}) > 1  # the comparison above can tell images apart

    extract(tokenizer, "--data", root, "--out", out, "--no-flip")  # replaces the folder
    flipless, flipless_labels, meta = read_codes(out)
    for i, file in enumerate(readable):
        want, z = reference_codes(model, file, 16, False)
        assert_same_codes(flipless[i], codes[2 * i], z, codebook, max_flips=1 / 16)
    assert flipless_labels.tolist() == [0, 0, 1, 1] and not meta["flip"]
    assert not [p for p in tmp_path.iterdir() if p.name != "codes"]  # no temporary folders left behind


def test_extract_default_photos_labels_tiles_by_photo(tokenizer, tmp_path):
    from fullvq.data import default_photos

    meta = extract(tokenizer, "--out", tmp_path / "codes", "--image-size", 64, "--no-flip", "--batch-size", 128)
    codes, labels, meta = read_codes(tmp_path / "codes")
    photos = default_photos()
    assert meta["num_classes"] == len(photos) == 11 and meta["grid"] == [16, 16] and meta["image_size"] == 64
    assert meta["class_names"][0] == "astronaut" and meta["class_names"][-1] == "grace_hopper"
    expected = [(round(p.width * 0.75) // 64) * (p.height // 64) for p in photos]  # tiles of the left 3/4
    assert np.bincount(labels, minlength=11).tolist() == expected and (np.diff(labels) >= 0).all()
    model, _ = checkpoint.load_model(tokenizer)
    top_left = torch.from_numpy(np.asarray(photos[0], dtype=np.float32)[:64, :64] / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        want = model.encode(top_left).indices.flatten().numpy()
    assert_same_codes(codes[0], want, latents(model, top_left), model.quantize.bake().numpy())


def test_extract_at_twice_the_training_size(tokenizer, tmp_path):
    """A 16 px tokenizer (f = 4) encodes 32 px images to 8 x 8 grids: the codes of the whole 32 px
    image, not of a 16 px part of it."""
    from fullvq.data import default_photos

    root = tmp_path / "classes"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    photos = default_photos()
    files = [root / "x" / "a.png", root / "x" / "b.png", root / "y" / "c.png"]
    for photo, file, size in zip(photos[5:8], files, [(48, 40), (32, 70), (33, 33)], strict=True):
        photo.resize(size).save(file)
    files.append(root / "y" / "small.png")
    photos[8].resize((30, 60)).save(files[-1])  # short side below 32: enlarged
    extract(tokenizer, "--data", root, "--out", tmp_path / "codes", "--image-size", 32, "--batch-size", 4)
    codes, labels, meta = read_codes(tmp_path / "codes")
    assert meta["image_size"] == 32 and meta["tokenizer_image_size"] == 16 and meta["grid"] == [8, 8]
    assert codes.shape == (2 * 4, 8 * 8) and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert meta["skipped"] == {} and meta["upscaled"] == [str(files[-1])]
    model, _ = checkpoint.load_model(tokenizer)
    codebook = model.quantize.bake().numpy()
    for i, file in enumerate(files):
        for mirror in (False, True):
            want, z = reference_codes(model, file, 32, mirror)
            assert want.shape == (64,)
            assert_same_codes(codes[2 * i + mirror], want, z, codebook, max_flips=2 / 64)


def test_two_processes_give_the_codes_of_one(tokenizer, class_folders, tmp_path):
    root, readable = class_folders
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [EXTRACT, str(tokenizer), "--data", str(root), "--batch-size", "2"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "corrupt.jpg" in one.stderr and "wrote" in one.stdout
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    (codes1, labels1, meta1), (codes2, labels2, meta2) = read_codes(tmp_path / "one"), read_codes(tmp_path / "two")
    model, _ = checkpoint.load_model(tokenizer)
    for i, file in enumerate(readable):  # each rank batches its own images: equal but for float ties
        for mirror in (False, True):
            z = reference_codes(model, file, 16, mirror)[1]
            assert_same_codes(codes2[2 * i + mirror], codes1[2 * i + mirror], z, model.quantize.bake().numpy(),
                              max_flips=1 / 16)
    np.testing.assert_array_equal(labels1, labels2)
    assert meta1 == meta2 and len(meta2["skipped"]) == 1 and len(meta2["upscaled"]) == 1  # from both ranks


def test_extract_errors(tokenizer, class_folders, tmp_path):
    root, _ = class_folders
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "flat" / "a.png")
    gpt = tmp_path / "gpt.pt"
    checkpoint.save(gpt, {"kind": "gpt", "config": {}, "model": {}, "step": 0})
    for args, message in [((tokenizer, "--out", tmp_path / "taken"), "exists and is not a codes folder"),
                          ((tokenizer, "--out", tmp_path / "c", "--image-size", 18), "not a multiple of the tokenizer"),
                          ((tokenizer, "--out", tmp_path / "c", "--data", tmp_path / "flat"), "no class folders"),
                          ((tokenizer, "--out", tmp_path / "c", "--data", tmp_path / "none"), "does not exist"),
                          ((gpt, "--out", tmp_path / "c"), "generator checkpoint")]:
        with pytest.raises(SystemExit, match=message):
            extract(*args)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me" and not (tmp_path / "c").exists()


def small_codes(path, rows=8, flip=True, **meta):
    codes = np.arange(rows * 6, dtype=np.int32).reshape(rows, 6) % 16
    meta = {"vocab_size": 16, "grid": [2, 3], "num_classes": 2, "class_names": ["a", "b"], "image_size": 8,
            "flip": flip, "tokenizer": "/tok.pt", "num_images": rows // (2 if flip else 1), "skipped": {}, **meta}
    write_codes(path, codes, np.arange(rows) % 2, meta)
    return codes


def test_read_codes_checks_every_member(tmp_path):
    good = tmp_path / "good"
    codes = small_codes(good)
    read, labels, meta = read_codes(good)
    np.testing.assert_array_equal(read, codes)
    assert labels.dtype == np.int64 and meta["format"] == "fullvq-codes" and meta["version"] == 1

    def tampered(name, edit):
        folder = tmp_path / name
        small_codes(folder)
        edit(folder)
        with pytest.raises(ValueError) as e:
            read_codes(folder)
        assert "re-extract" in str(e.value)
        return str(e.value)

    def meta_edit(**changes):
        return lambda f: (f / "meta.json").write_text(json.dumps({**json.loads((f / "meta.json").read_text()),
                                                                  **changes}))

    assert "codes.npy holds values in [0, 15], outside [0, vocab_size=8)" in tampered("vocab", meta_edit(vocab_size=8))
    assert "not a fullvq codes folder" in tampered("format", meta_edit(format="other"))
    assert "version 2 codes folder" in tampered("version", meta_edit(version=2))
    assert "'grid' is missing" in tampered("nogrid", meta_edit(grid=None))
    assert "3 class_names for num_classes=2" in tampered("names", meta_edit(class_names=["a", "b", "c"]))
    assert "codes.npy holds (8, 6) int32, meta.json says" in tampered("grid", meta_edit(grid=[3, 3]))
    assert "labels.npy holds (7,) int64, meta.json says (8,) int64" in tampered(
        "count", lambda f: np.save(f / "labels.npy", np.arange(7) % 2))
    assert "codes.npy holds (8, 7) int64" in tampered("shape", lambda f: np.save(f / "codes.npy", np.zeros((8, 7))
                                                                                  .astype(np.int64)))
    assert "labels.npy holds values in [0, 2]" in tampered("label", lambda f: np.save(f / "labels.npy",
                                                                                     np.arange(8) % 3))
    def cut(f):
        (f / "codes.npy").write_bytes((f / "codes.npy").read_bytes()[:150])

    assert "codes.npy is missing or unreadable" in tampered("cut", cut)
    assert "meta.json is unreadable" in tampered("json", lambda f: (f / "meta.json").write_text("{"))
    with pytest.raises(FileNotFoundError, match="no codes folder at .*extract_codes.py"):
        read_codes(tmp_path / "missing")


def test_dataset_holds_out_whole_images_and_batches_are_a_function_of_the_step(tmp_path):
    small_codes(tmp_path / "c", rows=84)  # 42 images and their flips
    data = CodesDataset(tmp_path / "c")
    assert data.heldout_rows.tolist() == [0, 1, 40, 41, 80, 81]
    assert len(data.train_rows) == 78 and not set(data.train_rows) & set(data.heldout_rows)
    a, b = data.batch(seed=3, step=5, batch_size=16, rank=1), data.batch(seed=3, step=5, batch_size=16, rank=1)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2], strict=True)) and a[2] == b[2]
    tokens, labels, _ = a
    assert tokens.shape == (16, 6) and tokens.dtype == labels.dtype == torch.int64
    train_rows = {tuple(r) for r in data.codes[data.train_rows].tolist()}
    assert {tuple(r) for r in tokens.tolist()} <= train_rows
    assert not torch.equal(data.batch(3, 6, 16, 1)[0], tokens) and not torch.equal(data.batch(3, 5, 16, 0)[0], tokens)
    small_codes(tmp_path / "one", rows=2)
    with pytest.raises(ValueError, match="leaves none to train on"):
        CodesDataset(tmp_path / "one")
