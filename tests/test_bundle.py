"""The engine bundle reader: every defect is an EngineError naming the file, the member and the fix.

Targeted defects first, each asserting the words of its problem and of its fix (`expect`); zip-level
defects are written entry by entry with zipfile (or patched into the headers) so that each file has
exactly the defect named. Then a seeded random fuzz (truncations, bit flips, overwritten ranges) run
in a subprocess with a time limit, then the regression corpus in tests/data/engine_corpus (files
kept from earlier fuzzing; tests/data/engine_corpus/README.md says how they were made).
"""

import hashlib
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fullvq_rt
import fullvq_rt.bundle
from bundle_factory import bundle_parts, make_bundle
from fullvq_rt.bundle import FORMAT, MAX_MANIFEST_BYTES, VERSION, EngineError, codebook_bytes, read_bundle, write_bundle

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


def expect(path, *problem, fix):
    """Reads `path`, which must be refused with an EngineError that names the file, holds every word of
    `problem` (the member or field, and what is wrong with it) and says `fix`, what to do."""
    assert problem and fix, "a refusal test names the problem and the fix"
    with pytest.raises(EngineError) as info:
        read_bundle(path)
    message = str(info.value)
    for word in (str(path), *problem, fix):
        assert word in message, f"{word!r} not in {message!r}"
    return message


def hand_zip(path, entries, compress=zipfile.ZIP_STORED):
    """Writes `entries` [(name, bytes)] as they are, in order, duplicates included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name, and writes it
        with zipfile.ZipFile(path, "w", compress) as z:
            for name, data in entries:
                z.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return path


def bundle_entries(extra=(), manifest_text=None, **manifest_fields):
    """A valid bundle's entries plus `extra` [(name, bytes)], with a manifest that lists every member (extra
    ones included, duplicates once) with its right sha256 and size: the only defects are the ones made here.
    `manifest_text` (a function of the manifest's JSON text) edits the manifest's text last."""
    manifest, members = bundle_parts()
    listed = dict(members, **dict(extra))
    manifest = dict(manifest, **manifest_fields, format=FORMAT, version=VERSION,
                    members={n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in listed.items()})
    text = json.dumps(manifest)
    if manifest_text:
        text = manifest_text(text)
    return [("manifest.json", text.encode() if isinstance(text, str) else text), *members.items(), *extra]


def set_flag_bits(path, name, bits):
    """ORs `bits` into member `name`'s general purpose flags, in its local header and its central one."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        local = z.getinfo(name).header_offset
    assert data[local:local + 4] == b"PK\x03\x04"
    data[local + 6] |= bits
    central = data.find(b"PK\x01\x02")
    while data[central + 46:central + 46 + int.from_bytes(data[central + 28:central + 30], "little")] != name.encode():
        central = data.find(b"PK\x01\x02", central + 4)
    data[central + 8] |= bits
    path.write_bytes(bytes(data))
    return path


def set_key(key, value):
    def edit(m):
        m[key] = value
    return edit


@pytest.mark.parametrize("edit, words, fix", [
    (set_key("version", 2), ["version 2"], "upgrade fullvq_rt"),
    (set_key("version", 0), ["version 0"], "re-export"),
    (set_key("version", "1"), ["integer version", "'1'"], "re-export"),
    (set_key("format", "onnx"), ["does not name the format 'fvq.engine'"], "build the file with export/to_trt.py"),
    (set_key("image_size", [16]), ["'image_size' must be two positive integers"], "re-export"),
    (set_key("grid", [4, 5]), ["image_size (16, 16), grid (4, 5)", "disagree"], "re-export"),
    (set_key("downsample", 0), ["downsample 0", "disagree"], "re-export"),
    (set_key("codebook_size", 65), ["codebook.npy", "float32 (65, 4)"], "re-export"),
    (set_key("codebook_dim", -1), ["codebook_dim", "positive integers"], "re-export"),
    (set_key("metric", "dot"), ["metric must be one of", "'dot'"], "re-export"),
    (set_key("dynamic_size", "yes"), ["'dynamic_size' must be true or false"], "re-export"),
    (set_key("trt", {"sm_90": {"tensorrt": "10.3", "precision": "fp16", "batch": [1, 8, 32]}}),
     ["trt/sm_90/encoder.plan", "missing"], "re-export"),
    (set_key("trt", {"sm_90": {"precision": "int4"}}), ["trt entry 'sm_90' needs tensorrt"], "re-export"),
    (set_key("trt", {"sm_90": {"tensorrt": "10.3", "precision": "fp16", "batch": [1, 8, 32], "gpu": 7}}),
     ["trt entry 'sm_90'", "'gpu' must be a string"], "re-export"),
    (set_key("trt", []), ["'trt' must be an object"], "re-export"),
    (set_key("members", []), ["'members' must map"], "re-export"),
])
def test_manifest_defects(good, tmp_path, edit, words, fix):
    member = next((w for w in words if w.endswith((".npy", ".plan"))), "manifest.json")
    expect(rezip(good, tmp_path / "bad.engine", manifest=edit), f"member {member!r}", *words, fix=fix)


def test_member_defects(good, tmp_path):
    encoder = zipfile.ZipFile(good).read("encoder.onnx")
    expect(rezip(good, tmp_path / "a.engine", members={"decoder.onnx": None}), "'decoder.onnx'",
           "listed in the manifest but missing from the archive", fix="re-export")
    expect(rezip(good, tmp_path / "b.engine", members={"extra.bin": b"x"}), "'extra.bin'", "not in the manifest",
           fix="do not use this file")
    expect(rezip(good, tmp_path / "c.engine", members={"encoder.onnx": encoder[:-1] + b"\0"}), "'encoder.onnx'",
           "sha256 does not match", fix="copy the file again or re-export it")
    expect(rezip(good, tmp_path / "d.engine", members={"encoder.onnx": encoder + b"\0"}), "'encoder.onnx'",
           f"is {len(encoder) + 1} bytes, the manifest says {len(encoder)}", fix="copy the file again or re-export")
    expect(rezip(good, tmp_path / "g.engine", compress=zipfile.ZIP_DEFLATED), "'manifest.json'", "is compressed",
           fix="re-export")
    expect(rezip(good, tmp_path / "h.engine", members={"manifest.json": None}), "'manifest.json'", "is missing",
           "not an fvq.engine bundle", fix="build one with export/to_trt.py")


def test_a_required_member_missing_from_archive_and_manifest(tmp_path):
    (manifest_entry, *members) = bundle_entries()
    listed = json.loads(manifest_entry[1])
    del listed["members"]["codebook.npy"]
    path = hand_zip(tmp_path / "a.engine", [("manifest.json", json.dumps(listed).encode()),
                                            *(e for e in members if e[0] != "codebook.npy")])
    expect(path, "'codebook.npy'", "is not listed in the manifest", fix="re-export")


def test_a_member_the_format_does_not_define(tmp_path):
    # listed in the manifest with its right hash, so that the name is the only defect
    path = hand_zip(tmp_path / "a.engine", bundle_entries(extra=[("notes.txt", b"hello")]))
    expect(path, "'notes.txt'", "listed in the manifest but is not a known member", fix="re-export")


def test_a_plan_without_its_trt_entry(tmp_path):
    path = hand_zip(tmp_path / "a.engine", bundle_entries(extra=[("trt/sm_90/encoder.plan", b"plan"),
                                                          ("trt/sm_90/decoder.plan", b"plan")]))
    expect(path, "'trt/sm_90/encoder.plan'", "has no trt entry in the manifest", fix="re-export")


@pytest.mark.parametrize("name, problem", [
    ("../evil", "has a '..' part"),
    ("trt/../../evil", "has a '..' part"),
    ("/etc/passwd", "is an absolute path"),
    ("graphs\\encoder.onnx", "contains a backslash"),
    ("..\\evil", "contains a backslash"),
    ("c:evil", "starts with a drive"),
    ("trt//encoder.plan", "has an empty or '.' part"),
    ("./encoder.onnx", "has an empty or '.' part"),
    ("generator/", "is a folder entry"),
    ("", "is empty"),
])
def test_unsafe_member_names(tmp_path, name, problem):
    # listed in the manifest with its right hash: what is refused is the name
    path = hand_zip(tmp_path / "a.engine", bundle_entries(extra=[(name, b"x")]))
    expect(path, f"member {name!r}", "unsafe member name", problem, fix="do not use this file")


@pytest.mark.parametrize("name", ["encoder.onnx", "manifest.json"])
def test_a_member_name_twice_in_the_archive(tmp_path, name):
    good = bundle_entries()
    second = dict(good)[name] if name == "manifest.json" else b"another graph"  # would be the one zipfile reads
    path = hand_zip(tmp_path / "a.engine", [*good, (name, second)])
    expect(path, f"member {name!r}", "appears twice in the archive", fix="do not use this file")


@pytest.mark.parametrize("bits, problem", [(0x01, "is encrypted"), (0x40, "is encrypted"), (0x20, "patched data")])
def test_encrypted_or_patched_members(tmp_path, bits, problem):
    # before, zipfile's RuntimeError / NotImplementedError came out as "cannot read the archive"
    path = set_flag_bits(hand_zip(tmp_path / "a.engine", bundle_entries()), "encoder.onnx", bits)
    expect(path, "'encoder.onnx'", problem, fix="re-export")


def test_a_zip_feature_zipfile_does_not_have(tmp_path):
    path = hand_zip(tmp_path / "a.engine", bundle_entries())
    data = bytearray(path.read_bytes())
    data[data.find(b"PK\x01\x02") + 6] = 99  # "version needed to extract": 9.9
    path.write_bytes(bytes(data))
    expect(path, "the archive uses a zip feature that fvq.engine does not", "zip file version 9.9",
           fix="re-export")


def test_a_manifest_over_the_size_limit(tmp_path):
    path = hand_zip(tmp_path / "a.engine", bundle_entries(built_by={"padding": "x" * MAX_MANIFEST_BYTES}))
    size = zipfile.ZipFile(path).getinfo("manifest.json").file_size
    expect(path, "'manifest.json'", f"is {size} bytes, over the {MAX_MANIFEST_BYTES} limit", fix="re-export")


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("manifest_text, problem", [
    (lambda text: text[:-1], "is not valid JSON (Expecting ',' delimiter"),
    (lambda text: text.replace('"format"', "format"), "is not valid JSON (Expecting property name"),
    (lambda text: text.encode("utf-16"), "is not UTF-8 text"),
    (lambda text: DEEP, "nested too deeply"),  # RecursionError in json: once "cannot read the archive"
    (lambda text: text.replace('"built_by": {"test": true}', '"built_by": ' + DEEP), "nested too deeply"),
    (lambda text: "[]", "is JSON an array, not an object"),
    (lambda text: '"fvq.engine"', "is JSON a string, not an object"),
])
def test_a_manifest_that_is_not_json_or_not_an_object(tmp_path, manifest_text, problem):
    path = hand_zip(tmp_path / "a.engine", bundle_entries(manifest_text=manifest_text))
    fix = "build the file with export/to_trt.py" if "not an object" in problem else "re-export it"
    expect(path, "member 'manifest.json'", problem, fix=fix)


def test_a_manifest_number_too_long_for_int(tmp_path):
    digits = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    if not digits:
        pytest.skip("this Python reads integers of any length")
    path = hand_zip(tmp_path / "a.engine", bundle_entries(
        manifest_text=lambda text: text.replace('"built_by": {"test": true}', '"built_by": ' + "7" * (digits + 1))))
    # json.loads raises a ValueError that is not a JSONDecodeError: it once escaped read_bundle
    expect(path, "member 'manifest.json'", "holds a number too long to read", fix="re-export")


def test_codebook_member_is_checked(tmp_path):
    manifest, members = bundle_parts()
    huge = np.zeros((64, 4), np.float32)
    huge[5] = 1e19
    for name, data, words in [
        ("nan", codebook_bytes(np.full((64, 4), np.nan, np.float32)), ["holds NaN or Inf"]),
        ("inf", codebook_bytes(np.full((64, 4), np.inf, np.float32)), ["holds NaN or Inf"]),
        ("f64", _npy(np.zeros((64, 4))), ["is float64 (64, 4), the manifest says float32 (64, 4)"]),
        ("shape", codebook_bytes(np.zeros((4, 64), np.float32)), ["is float32 (4, 64)", "float32 (64, 4)"]),
        ("junk", b"not an npy file", ["not a readable .npy"]),
        ("pickle", _npy(np.array([{"a": 1}], dtype=object)), ["not a readable .npy", "object arrays are refused"]),
        ("norm", codebook_bytes(huge), ["row 5 has squared norm", "overflows float32 distances"]),
    ]:
        path = tmp_path / f"{name}.engine"
        write_bundle(path, manifest, dict(members, **{"codebook.npy": data}))
        expect(path, "member 'codebook.npy'", *words, fix="re-export")


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
    last = zipfile.ZipFile(good).infolist()[-1].filename
    expect(tmp_path / "huge.engine", f"member {last!r}", f"declares {0xFFFFFFFF} bytes, more than the {len(data)}-byte",
           fix="copy it again or re-export it")


def test_missing_and_non_zip_files(tmp_path):
    expect(tmp_path / "none.engine", "no such file", fix="build one with `python export/to_trt.py")
    (tmp_path / "text.engine").write_text("hello")
    expect(tmp_path / "text.engine", "not a readable fvq.engine archive", "File is not a zip file",
           fix="copy it again or re-export it")
    (tmp_path / "folder.engine").mkdir()  # once "no such file"
    expect(tmp_path / "folder.engine", "is a folder", fix="give the path of the .engine file")
    os.mkfifo(tmp_path / "pipe.engine")
    expect(tmp_path / "pipe.engine", "is not a regular file", fix="give the path of an fvq.engine file")


def test_a_file_that_cannot_be_opened(good, monkeypatch):
    # once "cannot read the archive ...; re-export it": the archive is fine, the file is not readable here
    def denied(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fullvq_rt.bundle, "open", denied, raising=False)  # as root, chmod 000 would not stop us
    expect(good, "cannot open the file (Permission denied)", fix="check that this user may read it")


def test_a_damaged_member_is_named(good, tmp_path):
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("decoder.onnx")
    data[info.header_offset + 30 + len(info.filename) + 10] ^= 0xFF  # a byte of its data: its CRC-32 fails
    (tmp_path / "crc.engine").write_bytes(bytes(data))
    expect(tmp_path / "crc.engine", "member 'decoder.onnx'", "cannot be read from the archive", "Bad CRC-32",
           "truncated or damaged", fix="copy it again or re-export it")
    data = bytearray(good.read_bytes())
    end = data.rfind(b"PK\x05\x06")  # the central directory's offset, 100 bytes too far: members at negative offsets
    data[end + 16:end + 20] = (int.from_bytes(data[end + 16:end + 20], "little") + 100).to_bytes(4, "little")
    (tmp_path / "offset.engine").write_bytes(bytes(data))
    expect(tmp_path / "offset.engine", "member 'manifest.json'", "cannot be read from the archive", "OSError",
           fix="copy it again or re-export it")


def test_a_tampered_graph_with_a_matching_hash_fails_at_load(good, tmp_path):
    manifest, members = bundle_parts()
    write_bundle(tmp_path / "t.engine", manifest, dict(members, **{"encoder.onnx": b"\x08\x01garbage"}))
    read_bundle(tmp_path / "t.engine")  # hashes match: the archive is intact
    with pytest.raises(EngineError, match="member 'encoder.onnx': ONNX Runtime cannot load it .*; re-export"):
        fullvq_rt.Tokenizer(tmp_path / "t.engine")


def test_truncations_at_every_region(good, tmp_path):
    data = good.read_bytes()
    for cut in sorted({1, 30, 100, len(data) // 3, len(data) // 2, len(data) - 200, len(data) - 22, len(data) - 1}):
        path = tmp_path / f"cut{cut}.engine"
        path.write_bytes(data[:cut])
        expect(path, "not a readable fvq.engine archive", "truncated or damaged", fix="copy it again or re-export it")


FUZZ = r"""
import sys, random
from pathlib import Path
from fullvq_rt.bundle import EngineError, read_bundle
good = Path(sys.argv[1]).read_bytes()
rng = random.Random(int(sys.argv[2]))
out = Path(sys.argv[3])
FIXES = ("re-export", "copy it again", "copy the file again", "upgrade fullvq_rt", "do not use this file",
         "export/to_trt.py")
accepted = 0
for i in range(int(sys.argv[4])):
    data = bytearray(good)
    kind = rng.choice(["flip", "flip", "zero", "cut", "dup"])
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            p = rng.randrange(len(data)); data[p] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        p = rng.randrange(len(data))
        data[p:p + rng.randint(1, 64)] = bytes(min(64, len(data) - p))[: rng.randint(1, 64)]
    elif kind == "cut":
        data = data[: rng.randrange(len(data))]
    else:
        p = rng.randrange(len(data)); data[p:p] = data[p:p + rng.randint(1, 256)]
    out.write_bytes(bytes(data))
    try:
        read_bundle(out)
        accepted += 1
    except EngineError as e:
        if not str(e).startswith(f"{out}: ") or not any(fix in str(e) for fix in FIXES):
            print(f"case {i} ({kind}): the message does not name the file or a fix: {e}")
            sys.exit(1)
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


# What each corpus file must be refused for: (words of the problem, words of the fix). A file added to the
# corpus needs its line here (tests/data/engine_corpus/README.md).
DAMAGED = "copy it again or re-export it"
CORPUS_REFUSALS = {
    **{f"cut-{i}.engine": (["not a readable fvq.engine archive", "truncated or damaged"], DAMAGED) for i in range(4)},
    **{f"dup-{i}.engine": (["'manifest.json'", "cannot be read from the archive", "truncated or damaged"], DAMAGED)
       for i in range(4)},
    "flip-0.engine": (["'manifest.json'", "Bad CRC-32"], DAMAGED),
    "flip-1.engine": (["'decoder.onnx'", "Bad CRC-32"], DAMAGED),
    "flip-2.engine": (["'encoder.onnx'", "Bad CRC-32"], DAMAGED),
    "flip-3.engine": (["'encoder.onnx'", "Bad CRC-32"], DAMAGED),
    "zero-0.engine": (["'encoder.onnx'", "Bad CRC-32"], DAMAGED),
    "zero-1.engine": (["'encoder.onnx'", "Bad CRC-32"], DAMAGED),
    "zero-2.engine": (["'codebook.npy'", "Bad CRC-32"], DAMAGED),
    "zero-3.engine": (["'decoder.onnx'", "Bad CRC-32"], DAMAGED),
    "deflated.engine": (["'manifest.json'", "is compressed"], "re-export"),
    "extra-member.engine": (["'trt/sm_90/encoder.plan'", "in the archive but not in the manifest"],
                            "do not use this file"),
    "future-version.engine": (["'manifest.json'", "format version 9"], "upgrade fullvq_rt"),
    "traversal.engine": (["'../../escape.txt'", "unsafe member name", "'..' part"], "do not use this file"),
    "manifest-deep-nesting.engine": (["'manifest.json'", "not valid JSON", "nested too deeply"], "re-export"),
    "manifest-long-integer.engine": (["'manifest.json'", "a number too long to read"], "re-export"),
    "npy-deep-header.engine": (["'codebook.npy'", "not a readable .npy array"], "re-export"),
    "npy-shape-beyond-data.engine": (["'codebook.npy'", "holds 1024 bytes of values"], "re-export"),
    "fuzz-codebook-huge-norm.engine": (["'codebook.npy'", "row 53 has squared norm"], "re-export"),
    "fuzz-npy-header-indent.engine": (["'codebook.npy'", "not a readable .npy array"], "re-export"),
    "fuzz-npy-header-tokenize.engine": (["'codebook.npy'", "not a readable .npy array"], "re-export"),
    "fuzz-npy-huge-shape.engine": (["'codebook.npy'", "is complex64 (1000000000000, 4)"], "re-export"),
    "fuzz-utf8-name-central-dir.engine": (["not a readable fvq.engine archive", "flagged UTF-8 but is not"], DAMAGED),
    "fuzz-utf8-name-local-header.engine": (["'encoder.onnx'", "flagged UTF-8 but is not"], DAMAGED),
}


def test_regression_corpus():
    cases = {path.name for path in CORPUS.glob("*.engine")}
    assert cases == set(CORPUS_REFUSALS), ("corpus files without a line in CORPUS_REFUSALS, and lines without a "
                                           f"file: {sorted(cases ^ set(CORPUS_REFUSALS))}")
    for name, (problem, fix) in sorted(CORPUS_REFUSALS.items()):
        if name == "manifest-long-integer.engine" and not getattr(sys, "get_int_max_str_digits", lambda: 0)():
            continue  # a Python before 3.10.7 (or with the limit off) reads the integer: the bundle is valid
        expect(CORPUS / name, *problem, fix=fix)


def test_member_hashes_are_sha256_of_the_bytes(good):
    with zipfile.ZipFile(good) as z:
        manifest = json.loads(z.read("manifest.json"))
        for name, entry in manifest["members"].items():
            assert hashlib.sha256(z.read(name)).hexdigest() == entry["sha256"]
            assert z.getinfo(name).compress_type == zipfile.ZIP_STORED
