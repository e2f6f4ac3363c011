"""Regenerates this corpus: mutations of a small valid bundle that the reader must reject.

    cd tests/data/engine_corpus && python generate.py

Kept cases: four of each random mutation (bit flips, zeroed ranges, truncation, duplicated
ranges) among those the reader rejects, chosen by a fixed seed, plus hand-made ones (path
traversal, compressed member, future version, extra member, a manifest nested too deeply for
json, a manifest integer too long for int()). The fuzz-*.engine and npy-*.engine files are kept
as found, not regenerated; see README.md.
"""

import json
import random
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bundle_factory import make_bundle  # noqa: E402

from fullvq_rt.bundle import EngineError, read_bundle  # noqa: E402


def mutate(data: bytearray, kind: str, rng: random.Random) -> bytearray:
    p = rng.randrange(len(data))
    if kind == "flip":
        data[p] ^= 1 << rng.randrange(8)
    elif kind == "zero":
        n = rng.randint(1, 64)
        data[p:p + n] = bytes(len(data[p:p + n]))
    elif kind == "cut":
        data = data[:p]
    else:
        data[p:p] = data[p:p + rng.randint(1, 256)]
    return data


def rejected(path: Path) -> bool:
    try:
        read_bundle(path)
    except EngineError:
        return True
    return False


def main() -> None:
    here = Path(__file__).parent
    base = here / "base.tmp"
    make_bundle(base)
    good = base.read_bytes()
    rng = random.Random(2026)
    for kind in ("flip", "zero", "cut", "dup"):
        kept = 0
        while kept < 4:
            path = here / f"{kind}-{kept}.engine"
            path.write_bytes(bytes(mutate(bytearray(good), kind, rng)))
            kept += rejected(path)
    write_hand_made(here, base)
    base.unlink()


def write_hand_made(here: Path, base: Path) -> None:
    with zipfile.ZipFile(base) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(entries["manifest.json"])
    text = json.dumps(manifest)
    built_by = json.dumps(manifest["built_by"])
    depth = 25_000  # past json's recursion limit, and the file under fuzz_bundle.py's --max-len
    hand_made = {
        "traversal": (dict(entries, **{"../../escape.txt": b"x"}), zipfile.ZIP_STORED),
        "deflated": (entries, zipfile.ZIP_DEFLATED),
        "future-version": (dict(entries, **{"manifest.json": json.dumps(dict(manifest, version=9)).encode()}),
                           zipfile.ZIP_STORED),
        "extra-member": (dict(entries, **{"trt/sm_90/encoder.plan": b"plan"}), zipfile.ZIP_STORED),
        "manifest-deep-nesting": (dict(entries, **{"manifest.json": text.replace(
            built_by, "[" * depth + "]" * depth).encode()}), zipfile.ZIP_STORED),
        "manifest-long-integer": (dict(entries, **{"manifest.json": text.replace(built_by, "7" * 5000).encode()}),
                                  zipfile.ZIP_STORED),
    }
    for name, (members, compression) in hand_made.items():
        with zipfile.ZipFile(here / f"{name}.engine", "w", compression) as z:
            for member, data in members.items():
                z.writestr(member, data)
        assert rejected(here / f"{name}.engine"), name


if __name__ == "__main__":
    main()
