"""Coverage-guided fuzzing of the engine reader: `read_bundle(path)` and `Tokenizer(path, device="cpu")`.

    pip install atheris                           # prebuilt manylinux wheels (libFuzzer inside); no clang needed
    python bench/fuzz_bundle.py --seconds 1800                      # read_bundle, one process
    python bench/fuzz_bundle.py --target tokenizer --seconds 600    # + ONNX Runtime session creation
    python bench/fuzz_bundle.py --replay tests/data/engine_corpus/*.engine   # check files once, no atheris

The property: every input either loads or raises fullvq_rt.EngineError. Any other exception, a native
crash, an input that runs longer than --timeout seconds or a process that grows past --rss-mb is a
finding. Inputs are whole .engine files, so a finding is a corpus file as it stands: copy it to
tests/data/engine_corpus/fuzz-<what>.engine and add the words its refusal must hold to
tests/test_bundle.py's CORPUS_REFUSALS; test_regression_corpus replays it
(tests/data/engine_corpus/README.md).

Engine (atheris = libFuzzer driving instrumented Python): all loaded Python code (fullvq_rt, zipfile,
numpy's .npy reader, ...) is instrumented, so coverage counts Python branches. libFuzzer's byte-level
mutations alone rarely get past a zip CRC or a member's sha256, so a structure-aware mutator opens the
archive and edits one layer before re-packing it with correct CRCs: the manifest's bytes, one value of
the manifest's JSON, a member's bytes with its sha256 and size fixed in the manifest, the .npy header of
the codebook, the set of members (added, dropped, renamed) or the zip container itself (compression,
UTF-8 flag, zip64, comment). For read_bundle half the mutations are libFuzzer's, half structured; for the
tokenizer nine in ten are structured, most of them member bytes with the hash fixed, half of them made
from a valid bundle rather than from the corpus input, so that inputs get past read_bundle to ONNX
Runtime. "counts:" lines say how many inputs read_bundle accepted.

Seeds: tests/data/engine_corpus/*.engine plus valid bundles built here (plain, dynamic sizes, TensorRT
plans, a generator), so that the fuzzer starts from files that parse. Work files (the growing corpus,
libFuzzer's artifacts, the findings) go to --work (default /tmp/fvq-fuzz/<target>).

--keep-going (the default) records each distinct Python exception (type + the innermost frame, the
input in <work>/findings/) and keeps fuzzing; --stop-on-first lets libFuzzer stop and write
crash-<sha1> instead. Native crashes, timeouts and out-of-memory always stop libFuzzer
(<work>/artifacts/). Everything after `--` goes to libFuzzer (e.g. -- -runs=100000).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import struct
import sys
import traceback
import warnings
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "engine_corpus"
sys.path.insert(0, str(ROOT / "tests"))

import fullvq_rt  # noqa: E402 - after the tests folder joins sys.path
from fullvq_rt.bundle import EngineError, read_bundle, write_bundle  # noqa: E402

KNOWN_MEMBERS = ["manifest.json", "codebook.npy", "encoder.onnx", "decoder.onnx", "generator/prefill.onnx",
                 "generator/decode.onnx", "trt/sm_90/encoder.plan", "trt/sm_90/decoder.plan",
                 "trt/sm_80/encoder.plan", "trt/sm_9/decoder.plan", "../escape", "/abs", "a//b", "./x", "c:x",
                 "a\\b", "extra.bin", "generator/", ""]
MANIFEST_KEYS = ["format", "version", "members", "image_size", "grid", "downsample", "codebook_size",
                 "codebook_dim", "metric", "dynamic_size", "fixed_size_reason", "trt", "generator", "input",
                 "sha256", "size", "tensorrt", "precision", "batch", "hardware_compatibility", "gpu",
                 "vocab_size", "num_classes", "null_class", "layers", "heads", "head_dim", "seq_len"]
DICTIONARY = [b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"\x00\x08",
              b"\xff\xff\xff\xff", b"\x93NUMPY", b"'descr': '<f4'", b"'shape': (", b"'fortran_order': True",
              b"fvq.engine", b"sm_90", b"fp16", b"bf16", b"cosine", b"l2", b"null", b"true", b"false",
              b"1e400", b"NaN", b"-Infinity", b"[[[[", *(name.encode() for name in KNOWN_MEMBERS if name),
              *(json.dumps(key).encode() for key in MANIFEST_KEYS)]
JSON_VALUES = [None, True, False, 0, 1, -1, 2, 3, 4, 16, 64, 2**31, 2**63, 10**30, 1.5, float("nan"), "", "x",
               "l2", "cosine", "fvq.engine", "fp16", "10.3.0", [], {}, [1], [1, 1], [4, 4], [16, 16], [0, 4],
               [True, 1], [1.0, 1.0], [1, 8, 32], [8, 1, 32], [[16, 16], [16, 16], [32, 32]], [[1, 1]] * 3,
               {"sha256": "0" * 64, "size": 0}, {"sha256": "0" * 64}]
DEEP = "\u0000deeply nested\u0000"


# ----------------------------------------------------------------------------------------------- the property

class Finding(Exception):
    """Raised (with --stop-on-first) so that libFuzzer writes the input as crash-<sha1>."""


COUNTS = {"inputs": 0, "read_bundle accepted": 0}  # printed at every power of two inputs while fuzzing


def check(data: bytes, path: Path, target: str) -> BaseException | None:
    """Loads `data` as an engine file at `path`; None when it loads or raises EngineError, else the
    exception (the property's violation). For the tokenizer, every bundle that read_bundle accepts
    goes on to Tokenizer(bundle, device="cpu"): ONNX Runtime sessions of both graphs and the Codebook."""
    path.write_bytes(data)
    COUNTS["inputs"] += 1
    try:
        bundle = read_bundle(path)
        COUNTS["read_bundle accepted"] += 1
        if target == "tokenizer":
            fullvq_rt.Tokenizer(bundle, device="cpu", num_threads=1)
    except EngineError:
        return None
    except Exception as e:  # noqa: BLE001 - anything else is what we look for
        return e
    return None


def signature(error: BaseException) -> str:
    """The exception's type and the innermost frame (file:line), to tell distinct bugs apart."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(error).__name__}@{where}"


# ------------------------------------------------------------------------------------------------------ seeds

def valid_bundles(directory: Path) -> list[Path]:
    """Valid bundles that exercise every section: plain, dynamic sizes, TensorRT plans, a generator."""
    from bundle_factory import bundle_parts

    directory.mkdir(parents=True, exist_ok=True)
    manifest, members = bundle_parts()
    trt = {"sm_90": {"tensorrt": "10.3.0", "precision": "fp16", "batch": [1, 8, 32],
                     "size": [[16, 16], [16, 16], [32, 32]], "hardware_compatibility": "none", "gpu": "H100"}}
    generator = {"vocab_size": 64, "grid": [4, 4], "num_classes": 10, "null_class": 10, "layers": 2, "heads": 2,
                 "head_dim": 8, "seq_len": 16}
    variants = {
        "valid": (manifest, members),
        "valid-dynamic": (dict(manifest, dynamic_size=True, checked_sizes=[[16, 16], [32, 48]]), members),
        "valid-cosine-fixed": (dict(manifest, metric="cosine", dynamic_size=False, fixed_size_reason="test"),
                               members),
        "valid-trt": (dict(manifest, trt=trt), dict(members, **{"trt/sm_90/encoder.plan": b"plan-e",
                                                                "trt/sm_90/decoder.plan": b"plan-d"})),
        "valid-generator": (dict(manifest, generator=generator),
                            dict(members, **{"generator/prefill.onnx": members["encoder.onnx"],
                                             "generator/decode.onnx": members["decoder.onnx"]})),
    }
    paths = []
    for name, (m, parts) in variants.items():
        write_bundle(directory / f"{name}.engine", m, parts)
        read_bundle(directory / f"{name}.engine")
        paths.append(directory / f"{name}.engine")
    return paths


# ---------------------------------------------------------------------------------- structure-aware mutation

def unzip(data: bytes) -> list[tuple[str, bytes]] | None:
    """The (name, bytes) entries of a readable archive, in order; None if zipfile cannot read it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                return [(info.filename, z.read(info)) for info in z.infolist()]
    except Exception:  # noqa: BLE001 - anything unreadable goes to the byte-level mutator
        return None


def rezip(entries: list[tuple[str, bytes]], rng: random.Random, container: bool = False) -> bytes:
    """A stored zip of `entries` with correct CRCs; with `container`, one zip-level oddity."""
    buffer = io.BytesIO()
    oddity = rng.randrange(5) if container else -1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
            odd_index = rng.randrange(len(entries)) if entries else 0
            for i, (name, data) in enumerate(entries):
                info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                if i == odd_index and oddity == 0:
                    info.compress_type = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
                if i == odd_index and oddity == 2:
                    with z.open(info, "w", force_zip64=True) as f:
                        f.write(data)
                    continue
                if i == odd_index and oddity == 3:
                    info.extra = rng.choice([b"\x01\x00\x08\x00" + os.urandom(8), b"\x01\x00\x00\x00", b"\xff"])
                z.writestr(info, data)
            if oddity == 4:
                z.comment = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if oddity == 1 and entries and entries[odd_index][0]:
        return non_utf8_name_flagged_utf8(buffer.getvalue(), odd_index)
    return buffer.getvalue()


def non_utf8_name_flagged_utf8(data: bytes, index: int) -> bytes:
    """The zip `data` with member `index`'s name starting with byte 0x82 (no UTF-8 text starts with
    it) and the UTF-8 flag (0x800) set, in its local header and its central directory entry.
    zipfile cannot write this: it sets the flag itself, only for names it encodes as UTF-8."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        local, central = z.infolist()[index].header_offset, z.start_dir
    for _ in range(index):  # central entries: 46 bytes, then name, extra and comment
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", out, central + 28)
        central += 46 + name_len + extra_len + comment_len
    for flags_at, name_at in ((local + 6, local + 30), (central + 8, central + 46)):
        struct.pack_into("<H", out, flags_at, struct.unpack_from("<H", out, flags_at)[0] | 0x800)
        out[name_at] = 0x82
    return bytes(out)


def json_paths(value, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from json_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from json_paths(child, (*prefix, i))


def edit_json(manifest, rng: random.Random):
    """One edit of the manifest tree: replace a value, drop or add a key, or nest deeply."""
    paths = list(json_paths(manifest))
    path, _ = rng.choice(paths)
    new = rng.choice(JSON_VALUES + [v for _, v in rng.sample(paths, min(3, len(paths)))])
    if rng.random() < 0.05:
        new = DEEP  # spliced in as text by structured_mutation: json.dumps itself refuses deep nesting
    if not path:
        return new if rng.random() < 0.1 else manifest
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    roll = rng.random()
    if isinstance(parent, dict) and roll < 0.2:
        parent.pop(path[-1], None)
    elif isinstance(parent, dict) and roll < 0.4:
        parent[rng.choice(MANIFEST_KEYS + KNOWN_MEMBERS)] = new
    elif isinstance(parent, list) and roll < 0.15:
        parent.insert(rng.randrange(len(parent) + 1), new)
    elif isinstance(parent, list) and roll < 0.3:
        parent.pop(path[-1])
    else:
        parent[path[-1]] = new
    return manifest


def fix_member(entries: list[tuple[str, bytes]], name: str, data: bytes) -> None:
    """Sets member `name` to `data` and, when the manifest parses, its sha256 and size to match."""
    for i, (n, _) in enumerate(entries):
        if n == name:
            entries[i] = (n, data)
    for i, (n, raw) in enumerate(entries):
        if n == "manifest.json":
            try:
                manifest = json.loads(raw)
                manifest["members"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                entries[i] = (n, json.dumps(manifest, indent=1).encode())
            except Exception:  # noqa: BLE001, S110 - a manifest the fuzzer broke stays broken
                pass


def npy_header(rng: random.Random) -> bytes:
    """A codebook.npy with a plausible or hostile header and a little data."""
    descr = rng.choice(["'<f4'", "'>f4'", "'<f8'", "'|u1'", "'|O'", "'<U4'", "'|V0'", "'|V4'", "'<f2'",
                        "[('a', '<f4')]", "'<c8'", "'bogus'"])
    shape = rng.choice(["(64, 4)", "(4, 64)", "(64,)", "()", "(0, 4)", "(64, 4, 1)", "(2**40, 4)",
                        "(1000000000000, 4)", "(9223372036854775807, 4)", "(-1, 4)", "(64, 4.0)", "'x'",
                        "(64, 4,)", "(64, " + "-" * rng.choice([10, 100, 1000, 3000]) + "4)"])
    order = rng.choice(["False", "True", "None"])
    header = f"{{'descr': {descr}, 'fortran_order': {order}, 'shape': {shape}, }}"
    header = header + " " * ((-len(header) - 11) % 64) + "\n"
    version = rng.choice([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x09\x00"])
    length = len(header).to_bytes(2 if version == b"\x01\x00" else 4, "little")
    data = np.random.default_rng(rng.randrange(1 << 30)).standard_normal(rng.choice([0, 1, 64, 256])).astype("<f4")
    return b"\x93NUMPY" + version + length + header.encode("latin1") + data.tobytes()


def structured_mutation(entries: list[tuple[str, bytes]], max_size: int, rng: random.Random, atheris,
                        member_weight: int = 1) -> bytes:
    op = rng.choices(range(7), weights=[1, 1, member_weight, 1, 1, 1, 1])[0]
    names = [n for n, _ in entries]
    if op == 0 and "manifest.json" in names:  # the manifest's bytes (not hashed: only the CRC guards them)
        i = names.index("manifest.json")
        entries[i] = ("manifest.json", atheris.Mutate(entries[i][1], max(len(entries[i][1]) * 2, 64)))
    elif op == 1 and "manifest.json" in names:  # one value of the manifest's JSON
        i = names.index("manifest.json")
        try:
            text = json.dumps(edit_json(json.loads(entries[i][1]), rng))
            depth = rng.choice([10, 100, 1000, 5000])
            entries[i] = ("manifest.json", text.replace(json.dumps(DEEP), "[" * depth + "0" + "]" * depth).encode())
        except (ValueError, RecursionError):
            pass
    elif op == 2 and entries:  # a member's bytes, hash and size fixed in the manifest
        name, data = rng.choice(entries)
        if name != "manifest.json":
            fix_member(entries, name, atheris.Mutate(data, max(len(data) * 2, 64)))
    elif op == 3:  # the codebook's .npy header
        fix_member(entries, "codebook.npy", npy_header(rng))
    elif op == 4:  # the set of members
        roll = rng.random()
        if roll < 0.3 and entries:
            entries.pop(rng.randrange(len(entries)))
        elif roll < 0.6 and entries:
            i = rng.randrange(len(entries))
            entries[i] = (rng.choice(KNOWN_MEMBERS), entries[i][1])
        elif roll < 0.8 and entries:
            entries.insert(rng.randrange(len(entries) + 1), rng.choice(entries))
        else:
            name = rng.choice(KNOWN_MEMBERS)
            entries.append((name, b"x" * rng.randrange(16)))
            if rng.random() < 0.5:
                fix_member(entries, name, entries[-1][1])
    elif op == 5 and len(entries) > 1:  # member order
        rng.shuffle(entries)
    out = rezip(entries, rng, container=op == 6)
    if rng.random() < 0.1:  # and now and then a byte-level mutation on top
        out = atheris.Mutate(out, max_size)
    return out if len(out) <= max_size else atheris.Mutate(out[:max_size], max_size)


def make_mutator(atheris, target: str, valid: list[bytes]):
    """read: half libFuzzer's byte mutations, half structured. tokenizer: mostly structured, mostly
    member bytes with their hash fixed, half of them on one of the `valid` bundles rather than on the
    corpus input (which read_bundle mostly rejects), so that many inputs get past read_bundle to ONNX
    Runtime."""
    raw, member_weight, rebase = (0.5, 1, 0.0) if target == "read" else (0.1, 12, 0.5)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < raw:
            return atheris.Mutate(data, max_size)
        entries = unzip(rng.choice(valid) if rng.random() < rebase else data)
        if entries is None:
            return atheris.Mutate(data, max_size)
        return structured_mutation(entries, max_size, rng, atheris, member_weight)
    return mutator


# ------------------------------------------------------------------------------------------------------- main

def replay(files: list[str], target: str) -> int:
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"fvq-replay-{os.getpid()}.engine"
    bad = 0
    for name in files:
        accepted = COUNTS["read_bundle accepted"]
        error = check(Path(name).read_bytes(), scratch, target)
        status = (f"FINDING {signature(error)}: {str(error)[:300]}" if error is not None else
                  "ok: read_bundle accepts it" if COUNTS["read_bundle accepted"] > accepted else "ok: EngineError")
        print(f"{name}: {status}")
        bad += error is not None
    scratch.unlink(missing_ok=True)
    return 1 if bad else 0


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=("read", "tokenizer"), default="read")
    parser.add_argument("--seconds", type=int, default=60, help="libFuzzer -max_total_time")
    parser.add_argument("--timeout", type=int, default=None, help="per input, seconds (read: 5, tokenizer: 20)")
    parser.add_argument("--rss-mb", type=int, default=2048, help="libFuzzer -rss_limit_mb")
    parser.add_argument("--max-len", type=int, default=65536, help="largest input libFuzzer makes, bytes")
    parser.add_argument("--work", type=Path, default=None, help="default /tmp/fvq-fuzz/<target>")
    parser.add_argument("--stop-on-first", action="store_true", help="the first finding stops the run")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="check these files once and exit")
    args = parser.parse_args(argv)
    if args.replay:
        sys.exit(replay(args.replay, args.target))
    try:
        import atheris
    except ImportError:
        sys.exit("bench/fuzz_bundle.py needs atheris: pip install atheris")

    work = args.work or Path("/tmp/fvq-fuzz") / args.target
    seeds, corpus, findings, artifacts = (work / d for d in ("seeds", "corpus", "findings", "artifacts"))
    for d in (seeds, corpus, findings, artifacts):
        d.mkdir(parents=True, exist_ok=True)
    for path in CORPUS.glob("*.engine"):
        shutil.copy(path, seeds / path.name)
    valid = [path.read_bytes() for path in valid_bundles(seeds)]
    dictionary = work / "engine.dict"
    dictionary.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n' for token in DICTIONARY))
    scratch = Path("/dev/shm" if os.path.isdir("/dev/shm") else work) / f"fvq-fuzz-{os.getpid()}.engine"
    seen: dict[str, str] = {}
    warnings.simplefilter("ignore")  # warnings are not findings (numpy's, on old-style .npy headers, would flood)

    def test_one_input(data: bytes) -> None:
        error = check(data, scratch, args.target)
        if COUNTS["inputs"] & (COUNTS["inputs"] - 1) == 0 and COUNTS["inputs"] >= 1024:
            print(f"counts: {COUNTS}", flush=True)
        if error is None:
            return
        if args.stop_on_first:
            raise Finding(signature(error)) from error
        key = signature(error)
        if key not in seen:
            out = findings / f"{key.replace('@', '-').replace(':', '-')}-{hashlib.sha1(data).hexdigest()[:10]}.engine"
            out.write_bytes(data)
            seen[key] = out.name
            print(f"\n=== FINDING {key}: {str(error)[:300]} -> {out}", flush=True)
            traceback.print_exception(error, limit=-8, file=sys.stdout)

    timeout = args.timeout or (20 if args.target == "tokenizer" else 5)
    flags = [f"-max_total_time={args.seconds}", f"-timeout={timeout}", f"-rss_limit_mb={args.rss_mb}",
             f"-max_len={args.max_len}", f"-dict={dictionary}", f"-artifact_prefix={artifacts}/",
             "-print_final_stats=1", "-print_pcs=0", *extra, str(corpus), str(seeds)]
    print(f"fuzzing {args.target} for {args.seconds} s: work {work}, libFuzzer flags {flags}", flush=True)
    atheris.instrument_all()
    atheris.Setup([sys.argv[0], *flags], test_one_input, custom_mutator=make_mutator(atheris, args.target, valid))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
