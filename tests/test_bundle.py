"""The engine bundle reader: every defect is an EngineError naming the file, the member and the fix.

Targeted defects first, then a seeded random fuzz (truncations, bit flips, overwritten ranges) run
in a subprocess with a time limit, then the regression corpus in tests/data/engine_corpus (files
kept from earlier fuzzing; tests/data/engine_corpus/README.md says how they were made).
"""

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fullvq_rt
from bundle_factory import bundle_parts, make_bundle
from fullvq_rt.bundle import EngineError, codebook_bytes, read_bundle, write_bundle

CORPUS = Path(__file__).parent / "data" / "engine_corpus"


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.engine"
    make_bundle(path)
    return path


def rezip(src: Path, dst: Path, manifest=None, members=None, compress=zipfile.ZIP_STORED):
    """Writes dst from src's entries, with the manifest dict edited by `manifest(m)` and members
    replaced/added (name -> bytes) or removed (name -> None), without fixing any hash."""
    with zipfile.ZipFile(src) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    m = json.loads(entries["manifest.json"])
    if manifest:
        manifest(m)
    entries["manifest.json"] = json.dumps(m).encode()
    for name, data in (members or {}).items():
        if data is None:
            entries.pop(name, None)
        else:
            entries[name] = data
    with zipfile.ZipFile(dst, "w", compress) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return dst


def test_a_good_bundle_reads(good):
    b = read_bundle(good)
    assert b.image_size == (16, 16) and b.grid == (4, 4) and b.codebook.shape == (64, 4)
    assert not b.codebook.flags.writeable and b.metric == "l2" and b.trt == {}


def expect(path, *words):
    with pytest.raises(EngineError) as info:
        read_bundle(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def set_key(key, value):
    def edit(m):
        m[key] = value
    return edit


@pytest.mark.parametrize("edit, words", [
    (set_key("version", 2), ["version 2", "upgrade fullvq_rt"]),
    (set_key("version", 0), ["version 0", "re-export"]),
    (set_key("version", "1"), ["integer version"]),
    (set_key("format", "onnx"), ["does not name the format"]),
    (set_key("image_size", [16]), ["'image_size' must be two positive integers"]),
    (set_key("grid", [4, 5]), ["disagree"]),
    (set_key("downsample", 0), ["disagree"]),
    (set_key("codebook_size", 65), ["codebook.npy", "float32 (65, 4)"]),
    (set_key("codebook_dim", -1), ["positive integers"]),
    (set_key("metric", "dot"), ["metric must be one of"]),
    (set_key("trt", {"sm_90": {"tensorrt": "10.3", "precision": "fp16", "batch": [1, 8, 32]}}),
     ["trt/sm_90/encoder.plan", "missing"]),
    (set_key("trt", {"sm_90": {"precision": "int4"}}), ["trt entry 'sm_90'"]),
    (set_key("members", []), ["'members' must map"]),
])
def test_manifest_defects(good, tmp_path, edit, words):
    member = next((w for w in words if w.endswith((".npy", ".plan"))), "manifest.json")
    expect(rezip(good, tmp_path / "bad.engine", manifest=edit), member, *words)


def test_member_defects(good, tmp_path):
    encoder = zipfile.ZipFile(good).read("encoder.onnx")
    expect(rezip(good, tmp_path / "a.engine", members={"decoder.onnx": None}), "decoder.onnx", "missing")
    expect(rezip(good, tmp_path / "b.engine", members={"extra.bin": b"x"}), "extra.bin", "not in the manifest")
    expect(rezip(good, tmp_path / "c.engine", members={"encoder.onnx": encoder[:-1] + b"\0"}), "encoder.onnx",
           "sha256", "re-export")
    expect(rezip(good, tmp_path / "d.engine", members={"encoder.onnx": encoder + b"\0"}), "encoder.onnx",
           "the manifest says")
    expect(rezip(good, tmp_path / "e.engine", members={"../evil": b"x"}), "'../evil'", "unsafe member name")
    expect(rezip(good, tmp_path / "f.engine", members={"/etc/passwd": b"x"}), "unsafe member name")
    expect(rezip(good, tmp_path / "g.engine", compress=zipfile.ZIP_DEFLATED), "is compressed")
    expect(rezip(good, tmp_path / "h.engine", members={"manifest.json": None}), "not an fvq.engine bundle")


def test_codebook_member_is_checked(tmp_path):
    manifest, members = bundle_parts()
    for name, data, words in [
        ("nan", codebook_bytes(np.full((64, 4), np.nan, np.float32)), ["NaN or Inf"]),
        ("f64", _npy(np.zeros((64, 4))), ["float64", "float32 (64, 4)"]),
        ("junk", b"not an npy file", ["not a readable .npy"]),
        ("pickle", _npy(np.array([{"a": 1}], dtype=object)), ["not a readable .npy"]),
    ]:
        path = tmp_path / f"{name}.engine"
        write_bundle(path, manifest, dict(members, **{"codebook.npy": data}))
        expect(path, "codebook.npy", *words)


def _npy(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def test_huge_declared_size_is_refused_without_reading(good, tmp_path):
    data = bytearray(good.read_bytes())
    # the central directory entry of the last member: patch its uncompressed size to 2^32 - 1
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (0xFFFFFFFF).to_bytes(4, "little")
    (tmp_path / "huge.engine").write_bytes(bytes(data))
    expect(tmp_path / "huge.engine")


def test_missing_and_non_zip_files(tmp_path):
    expect(tmp_path / "none.engine", "no such file", "export/to_trt.py")
    (tmp_path / "text.engine").write_text("hello")
    expect(tmp_path / "text.engine", "not a readable fvq.engine archive")


def test_a_tampered_graph_with_a_matching_hash_fails_at_load(good, tmp_path):
    manifest, members = bundle_parts()
    write_bundle(tmp_path / "t.engine", manifest, dict(members, **{"encoder.onnx": b"\x08\x01garbage"}))
    read_bundle(tmp_path / "t.engine")  # hashes match: the archive is intact
    with pytest.raises(EngineError, match="encoder.onnx.*ONNX Runtime cannot load it"):
        fullvq_rt.Tokenizer(tmp_path / "t.engine")


def test_truncations_at_every_region(good, tmp_path):
    data = good.read_bytes()
    for cut in sorted({1, 30, 100, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 22, len(data) - 1}):
        path = tmp_path / f"cut{cut}.engine"
        path.write_bytes(data[:cut])
        expect(path)


FUZZ = r"""
import sys, random
from pathlib import Path
from fullvq_rt.bundle import EngineError, read_bundle
good = Path(sys.argv[1]).read_bytes()
rng = random.Random(int(sys.argv[2]))
out = Path(sys.argv[3])
accepted = 0
for i in range(int(sys.argv[4])):
    data = bytearray(good)
    kind = rng.choice(["flip", "flip", "zero", "cut", "dup"])
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            p = rng.randrange(len(data)); data[p] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        p = rng.randrange(len(data)); data[p:p + rng.randint(1, 64)] = bytes(min(64, len(data) - p))[: rng.randint(1, 64)]
    elif kind == "cut":
        data = data[: rng.randrange(len(data))]
    else:
        p = rng.randrange(len(data)); data[p:p] = data[p:p + rng.randint(1, 256)]
    out.write_bytes(bytes(data))
    try:
        read_bundle(out)
        accepted += 1
    except EngineError:
        pass
    except Exception as e:
        print(f"case {i} ({kind}): {type(e).__name__}: {e}")
        sys.exit(1)
print(f"accepted {accepted}")
"""


def test_random_fuzz_never_crashes_or_hangs(good, tmp_path):
    result = subprocess.run([sys.executable, "-c", FUZZ, str(good), "1234", str(tmp_path / "case.engine"), "400"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    # a flip inside zip padding or an unread header field can leave a bundle intact; nothing else may pass
    assert int(result.stdout.split()[-1]) < 40


def test_regression_corpus():
    cases = sorted(CORPUS.glob("*.engine"))
    assert len(cases) >= 10
    for path in cases:
        with pytest.raises(EngineError):
            read_bundle(path)


def test_member_hashes_are_sha256_of_the_bytes(good):
    with zipfile.ZipFile(good) as z:
        manifest = json.loads(z.read("manifest.json"))
        for name, entry in manifest["members"].items():
            assert hashlib.sha256(z.read(name)).hexdigest() == entry["sha256"]
            assert z.getinfo(name).compress_type == zipfile.ZIP_STORED
