"""Property-based tests (hypothesis) of the engine bundle: write_bundle -> read_bundle round trips.

Hypothesis draws valid bundles from bundle_factory-like parts (K, D, downsample f, token grid,
metric, codebook values down to -0.0, subnormals and +-3e38 (codes scaled into the lookup's squared-norm
limit), the optional size fields
dynamic_size / checked_sizes / fixed_size_reason, TensorRT entries with their plans, a generator
section with its graphs, arbitrary JSON in built_by and in extra keys); everything must read back
equal, bit for bit. A single flipped byte anywhere in the file must either be refused with
EngineError or leave the content intact (a byte of an unread header field): never another
exception and never a bundle that reads back different. Runs are derandomized.
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bundle_factory import conv_graph
from fullvq_rt.bundle import FORMAT, MAX_SQUARED_NORM, VERSION, EngineError, codebook_bytes, read_bundle, write_bundle

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KNOWN_KEYS = {"image_size", "downsample", "grid", "codebook_size", "codebook_dim", "metric", "input", "built_by",
              "trt", "dynamic_size", "checked_sizes", "fixed_size_reason", "generator", "format", "version", "members"}

graph = functools.lru_cache(maxsize=None)(conv_graph)

# text for names and JSON values: ASCII, quotes and escapes, control characters, non-ASCII, a lone
# surrogate (json writes it escaped); an explicit alphabet spares hypothesis' Unicode tables
CHARS = st.sampled_from(list("abcXYZ019 _-.:/\\\"'{}[],\n\t\x00\x1f\x7f\u00e9\u4e2d\U0001f642\u2028") + ["\ud800"])


def text(min_size=0, max_size=10):
    return st.text(CHARS, min_size=min_size, max_size=max_size)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text(max_size=8), children, max_size=4),
    max_leaves=12)


@st.composite
def codebooks(draw, k: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    family = draw(st.sampled_from(["gaussian", "specials", "extreme"]))
    codebook = rng.standard_normal((k, d)).astype(np.float32)
    if family != "gaussian":
        specials = np.array([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 1e-30, 1e30],
                            np.float32)
        mask = rng.random((k, d)) < 0.5
        codebook[mask] = specials[rng.integers(0, len(specials), mask.sum())]
    if family == "extreme":
        with np.errstate(over="ignore", under="ignore"):
            codebook *= np.float32(10.0 ** draw(st.integers(-30, 30)))
        codebook[~np.isfinite(codebook)] = np.float32(1e38)
    # a code of squared norm over the lookup's limit is refused at load (test_bundle's corpus): scale
    # such rows down to a quarter of it, keeping their zeros, signs and subnormal neighbours
    norms = (codebook.astype(np.float64) ** 2).sum(1)
    big = norms > MAX_SQUARED_NORM / 4
    codebook[big] = (codebook[big].astype(np.float64) / np.sqrt(norms[big] / (MAX_SQUARED_NORM / 4))[:, None]
                     ).astype(np.float32)
    return codebook


@st.composite
def bundles(draw):
    """(manifest, members) of a valid bundle, and what read_bundle should make of it."""
    k, d = draw(st.integers(1, 300)), draw(st.integers(1, 8))
    f = draw(st.sampled_from([1, 2, 4, 8, 16]))
    grid = [draw(st.integers(1, 8)), draw(st.integers(1, 8))]
    image_size = [grid[0] * f, grid[1] * f]
    codebook = draw(codebooks(k, d))
    members = {"codebook.npy": codebook_bytes(codebook), "encoder.onnx": graph("Conv", 3, d, f, 1),
               "decoder.onnx": graph("ConvTranspose", d, 3, f, 2)}
    manifest = {"image_size": image_size, "downsample": f, "grid": grid, "codebook_size": k, "codebook_dim": d,
                "metric": draw(st.sampled_from(["l2", "cosine"])),
                "input": draw(st.sampled_from([{"range": [-1.0, 1.0]},
                                               {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}])),
                "built_by": draw(st.dictionaries(text(max_size=10), JSON, max_size=4))}
    sizes = draw(st.sampled_from(["absent", "dynamic", "fixed"]))
    if sizes == "dynamic":
        pairs = st.tuples(st.integers(1, 6), st.integers(1, 6)).map(lambda p: [p[0] * f, p[1] * f])
        manifest.update(dynamic_size=True, checked_sizes=draw(st.lists(pairs, min_size=1, max_size=4)))
    elif sizes == "fixed":
        manifest.update(dynamic_size=False, fixed_size_reason=draw(text(max_size=40)))
    trt = {}
    for arch in draw(st.lists(st.integers(10, 999).map(lambda n: f"sm_{n}"), max_size=3, unique=True)):
        batch = sorted(draw(st.lists(st.integers(1, 64), min_size=3, max_size=3)))
        entry = {"tensorrt": draw(text(max_size=8)), "precision": draw(st.sampled_from(["fp32", "fp16", "bf16"])),
                 "batch": batch}
        if draw(st.booleans()):
            sides = sorted(draw(st.lists(st.integers(1, 8), min_size=6, max_size=6)))
            entry["size"] = [[sides[0] * f, sides[1] * f], [sides[2] * f, sides[3] * f], [sides[4] * f, sides[5] * f]]
        if draw(st.booleans()):
            entry["hardware_compatibility"] = draw(st.sampled_from(["none", "same_compute_capability"]))
            entry["gpu"] = draw(text(max_size=12))
        trt[arch] = entry
        for net in ("encoder", "decoder"):
            members[f"trt/{arch}/{net}.plan"] = draw(st.binary(max_size=64))
    manifest["trt"] = trt
    if draw(st.booleans()):
        gen_grid = grid if sizes != "dynamic" else [draw(st.integers(1, 8)), draw(st.integers(1, 8))]
        classes = draw(st.integers(1, 1000))
        manifest["generator"] = {"vocab_size": k, "grid": gen_grid, "num_classes": classes, "null_class": classes,
                                 "layers": draw(st.integers(1, 4)), "heads": draw(st.integers(1, 4)),
                                 "head_dim": draw(st.integers(1, 64)), "seq_len": gen_grid[0] * gen_grid[1]}
        members["generator/prefill.onnx"] = draw(st.binary(max_size=64))
        members["generator/decode.onnx"] = draw(st.binary(max_size=64))
    for key, value in draw(st.dictionaries(text(min_size=1, max_size=10).filter(lambda s: s not in KNOWN_KEYS),
                                           JSON, max_size=3)).items():
        manifest[key] = value  # unknown keys are kept as they are
    return manifest, members, codebook


def check_round_trip(bundle, manifest, members, codebook) -> None:
    assert bundle.image_size == tuple(manifest["image_size"]) and bundle.grid == tuple(manifest["grid"])
    assert bundle.downsample == manifest["downsample"] and bundle.metric == manifest["metric"]
    assert bundle.codebook.dtype == np.float32 and bundle.codebook.shape == codebook.shape
    np.testing.assert_array_equal(bundle.codebook.view(np.uint32), codebook.view(np.uint32))  # -0.0, subnormals too
    assert not bundle.codebook.flags.writeable
    assert bundle.members == members
    listed = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
              for name, data in members.items()}
    assert bundle.manifest == dict(manifest, format=FORMAT, version=VERSION, members=listed)
    assert bundle.dynamic_size == manifest.get("dynamic_size", False)
    if "fixed_size_reason" in manifest:
        assert bundle.fixed_size_reason == manifest["fixed_size_reason"]
    assert set(bundle.trt) == set(manifest["trt"])
    for arch, entry in manifest["trt"].items():
        plans = bundle.trt[arch]
        assert (plans.arch, plans.tensorrt, plans.precision, plans.batch) == (arch, entry["tensorrt"],
                                                                             entry["precision"], tuple(entry["batch"]))
        assert plans.size == tuple(tuple(p) for p in entry.get("size", [manifest["image_size"]] * 3))
        assert plans.hardware_compatibility == entry.get("hardware_compatibility", "none")
        assert plans.gpu == entry.get("gpu", "")
    section = manifest.get("generator")
    if section is None:
        assert bundle.generator is None
    else:
        spec = bundle.generator
        assert spec.grid == tuple(section["grid"])
        for key in ("vocab_size", "num_classes", "null_class", "layers", "heads", "head_dim", "seq_len"):
            assert getattr(spec, key) == section[key], key


@settings(max_examples=60, **SETTINGS)
@given(case=bundles(), name=st.text("abcdefghijklmnopqrstuvwxyz0123456789-_. ", min_size=1, max_size=20))
def test_write_then_read_gives_back_everything(case, name):
    manifest, members, codebook = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sub dir" / f"{name}.engine"
        write_bundle(path, manifest, members)
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
        with zipfile.ZipFile(path) as archive:
            assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
            assert json.loads(archive.read("manifest.json"))["format"] == FORMAT
        bundle = read_bundle(path)
        check_round_trip(bundle, manifest, members, codebook)
        # what was read writes back to the same bundle
        again = Path(folder) / "again.engine"
        written = {key: value for key, value in bundle.manifest.items() if key not in ("format", "version", "members")}
        write_bundle(again, written, bundle.members)
        check_round_trip(read_bundle(again), manifest, members, codebook)


@settings(max_examples=40, **SETTINGS)
@given(case=bundles(), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_is_refused_or_harmless(case, where, bit):
    manifest, members, codebook = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "b.engine"
        write_bundle(path, manifest, members)
        data = bytearray(path.read_bytes())
        data[int(where * len(data))] ^= 1 << bit
        path.write_bytes(bytes(data))
        try:
            bundle = read_bundle(path)
        except EngineError as e:
            assert str(path) in str(e)
            return
        check_round_trip(bundle, manifest, members, codebook)
