"""The engine bundle `fvq.engine`: one self-describing zip archive (members stored, not compressed).

    manifest.json                format, version, training image size, downsample factor f, token grid,
                                 whether the graphs take other sizes (dynamic_size, checked_sizes, else
                                 fixed_size_reason), codebook, metric, input normalisation, sha256 and
                                 size of every member, what built it
    codebook.npy                 (K, D) float32, baked
    encoder.onnx, decoder.onnx   image (B, 3, H, W) in [-1, 1] -> latents (B, D, H/f, W/f); codes -> image
    trt/sm_XY/encoder.plan ...   optional TensorRT plans for one GPU architecture (manifest "trt")
    generator/prefill.onnx,      optional, the autoregressive generator (manifest "generator": vocabulary,
    generator/decode.onnx        grid, classes, null class, KV-cache layout); see fullvq_rt.generator

`read_bundle` checks everything before anything is used: the archive, member names (nothing that
could escape a folder, nothing unknown, nothing missing), sizes against the manifest and the file,
every sha256, the manifest's fields and the codebook's shape. Any defect raises `EngineError`
naming the file, the member and what to do. `write_bundle` is the one writer (used by export).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "fvq.engine"
VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_MEMBERS = ("codebook.npy", "encoder.onnx", "decoder.onnx")
GENERATOR_MEMBERS = ("generator/prefill.onnx", "generator/decode.onnx")
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBER_BYTES = 16 << 30  # larger than any tokenizer network: a corrupt or hostile size field
MAX_SQUARED_NORM = 1e37  # of a code; the lookup's limit (cpp/checks.h kMaxSquaredNorm)
_TRT_PLAN = re.compile(r"trt/(sm_[0-9]{2,3})/(encoder|decoder)\.plan")
_SHA256 = re.compile(r"[0-9a-f]{64}")
METRICS = ("l2", "cosine")
_ZIP_ENCRYPTED, _ZIP_PATCH_DATA, _ZIP_STRONG_ENCRYPTION = 1 << 0, 1 << 5, 1 << 6  # general purpose flag bits


class EngineError(ValueError):
    """An engine bundle that cannot be used; the message names the file, the member and the fix."""


@dataclass(frozen=True)
class TrtPlans:
    """TensorRT plans for one GPU architecture, e.g. arch "sm_90"."""

    arch: str
    tensorrt: str           # the TensorRT version that built (and must run) them, exactly
    precision: str
    batch: tuple[int, int, int]  # optimisation profile min, opt, max
    size: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (H, W) min, opt, max in pixels
    hardware_compatibility: str = "none"  # "same_compute_capability": any GPU of `arch`; "none": the GPU `gpu`
    gpu: str = ""           # the name of the GPU that built them ("" in bundles that predate the field)


@dataclass(frozen=True)
class GeneratorSpec:
    """The generator's settings: R rows (2x the images with CFG) keep a KV cache of shape
    (layers, R, heads, seq_len, head_dim) each for keys and values."""

    vocab_size: int
    grid: tuple[int, int]
    num_classes: int
    null_class: int
    layers: int
    heads: int
    head_dim: int
    seq_len: int

    @property
    def decode_inputs(self) -> list[str]:
        """The decode graph's inputs: token, pos, then one (R, heads, seq_len, head_dim) cache input
        per layer, keys first (so that ONNX Runtime reads each layer of the caller's cache in place)."""
        return ["token", "pos", *(f"{kind}_cache_{i}" for kind in "kv" for i in range(self.layers))]


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its manifest fields, the codebook and the bytes of every member."""

    path: Path
    image_size: tuple[int, int]
    downsample: int
    grid: tuple[int, int]
    metric: str
    codebook: np.ndarray    # (K, D) float32, read-only
    members: dict[str, bytes]
    trt: dict[str, TrtPlans]
    manifest: dict[str, Any]
    generator: GeneratorSpec | None = None
    dynamic_size: bool = False  # the graphs take any H, W that are multiples of `downsample`
    fixed_size_reason: str = ""  # why not, when not


def write_bundle(path: str | os.PathLike, manifest: dict[str, Any], members: dict[str, bytes]) -> None:
    """Writes `members` and `manifest` (plus format, version and every member's sha256 and size)
    as a stored zip archive, atomically (temporary file + rename)."""
    manifest = dict(manifest, format=FORMAT, version=VERSION,
                    members={name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                             for name, data in sorted(members.items())})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            z.writestr(MANIFEST, json.dumps(manifest, indent=1))
            for name, data in sorted(members.items()):
                z.writestr(name, data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a bundle is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def codebook_bytes(codebook: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(codebook, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def read_bundle(path: str | os.PathLike) -> Bundle:
    """The verified bundle at `path`, or EngineError."""
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise EngineError(f"{path}: is a folder, not an fvq.engine file; give the path of the .engine file")
        if path.exists():
            raise EngineError(f"{path}: is not a regular file (a device, pipe or socket); give the path of an "
                              f"fvq.engine file")
        raise EngineError(f"{path}: no such file; build one with `python export/to_trt.py ckpt.pt -o {path}`")
    try:
        file = open(path, "rb")  # apart from the archive: its errors are not the archive's
    except OSError as e:
        raise EngineError(f"{path}: cannot open the file ({e.strerror or e}); check that this user may read "
                          f"it") from None
    try:
        with file, zipfile.ZipFile(file) as archive:
            infos = _check_entries(path, archive.infolist(), os.fstat(file.fileno()).st_size)
            manifest = _read_manifest(path, archive, infos)
            members = _read_members(path, archive, infos, manifest)
    except (zipfile.BadZipFile, EOFError, OSError) as e:  # OSError: a seek to an offset the file does not have
        raise EngineError(f"{path}: not a readable fvq.engine archive ({e.__class__.__name__}: {e}); the file is "
                          f"truncated or damaged: copy it again or re-export it") from None
    except UnicodeDecodeError as e:  # decoding the central directory (member reads name their member)
        raise EngineError(f"{path}: not a readable fvq.engine archive: a member name in its directory is flagged "
                          f"UTF-8 but is not ({e}); the file is damaged: copy it again or re-export it") from None
    except (NotImplementedError, RuntimeError) as e:  # zip features that _check_entries does not know
        raise EngineError(f"{path}: the archive uses a zip feature that fvq.engine does not "
                          f"({e.__class__.__name__}: {e}); re-export it with export/to_trt.py") from None
    return _build(path, manifest, members)


def _fail(path: Path, member: str, problem: str, fix: str = "re-export it with export/to_trt.py") -> EngineError:
    return EngineError(f"{path}: member {member!r}: {problem}; {fix}")


def _unsafe(name: str) -> str:
    """Why member `name` could write outside a folder when unpacked ("" when it could not)."""
    parts = name.split("/")
    if not name:
        return "is empty"
    if name.startswith("/"):
        return "is an absolute path"
    if "\\" in name:
        return "contains a backslash (a Windows folder separator)"
    if ":" in parts[0]:
        return "starts with a drive or device (':' in its first part)"
    if name.endswith("/"):
        return "is a folder entry (ends with '/')"
    if ".." in parts:
        return "has a '..' part (it points outside its folder)"
    if any(p in ("", ".") for p in parts):
        return "has an empty or '.' part"
    return ""


def _check_entries(path: Path, infos: list[zipfile.ZipInfo], file_size: int) -> dict[str, zipfile.ZipInfo]:
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        reason = _unsafe(name)
        if reason:
            raise _fail(path, name, f"unsafe member name: {reason}", "do not use this file")
        if name in entries:
            raise _fail(path, name, "appears twice in the archive (a second copy could replace the checked one)",
                        "do not use this file; re-export it")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _fail(path, name, "is compressed; fvq.engine members are stored")
        if info.flag_bits & (_ZIP_ENCRYPTED | _ZIP_STRONG_ENCRYPTION):
            raise _fail(path, name, "is encrypted; fvq.engine members are stored without encryption")
        if info.flag_bits & _ZIP_PATCH_DATA:
            raise _fail(path, name, "is zip 'patched data' (flag bit 5); fvq.engine members are whole files")
        if info.file_size > min(MAX_MEMBER_BYTES, file_size):
            raise _fail(path, name, f"declares {info.file_size} bytes, more than the {file_size}-byte file holds",
                        "the file is truncated or damaged: copy it again or re-export it")
        entries[name] = info
    if MANIFEST not in entries:
        raise _fail(path, MANIFEST, "is missing: this is not an fvq.engine bundle",
                    "build one with export/to_trt.py")
    return entries


def _read_manifest(path: Path, archive: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo]) -> dict[str, Any]:
    if infos[MANIFEST].file_size > MAX_MANIFEST_BYTES:
        raise _fail(path, MANIFEST, f"is {infos[MANIFEST].file_size} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        text = _read_member(path, archive, infos[MANIFEST]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(path, MANIFEST, f"is not UTF-8 text, so not valid JSON ({e})") from None
    try:
        manifest = json.loads(text)
    except RecursionError:  # json's parser recurses once per level of nesting
        raise _fail(path, MANIFEST, "is not valid JSON for this reader: its arrays or objects are nested too "
                                    "deeply to parse") from None
    except json.JSONDecodeError as e:
        raise _fail(path, MANIFEST, f"is not valid JSON ({e})") from None
    except ValueError as e:  # an integer of more digits than int() takes (sys.get_int_max_str_digits)
        raise _fail(path, MANIFEST, f"holds a number too long to read ({e})") from None
    if not isinstance(manifest, dict):
        kind = {list: "an array", str: "a string", type(None): "null"}.get(type(manifest), "a single value")
        raise _fail(path, MANIFEST, f"is JSON {kind}, not an object: not an fvq.engine manifest",
                    "build the file with export/to_trt.py")
    if manifest.get("format") != FORMAT:
        raise _fail(path, MANIFEST, f"does not name the format {FORMAT!r}", "build the file with export/to_trt.py")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, MANIFEST, f"has no integer version (got {version!r})")
    if version > VERSION:
        raise _fail(path, MANIFEST, f"is format version {version}, this fullvq_rt reads version {VERSION}",
                    "upgrade fullvq_rt")
    if version < VERSION:
        raise _fail(path, MANIFEST, f"is format version {version}, this fullvq_rt reads version {VERSION}",
                    "re-export the checkpoint with this fullvq")
    listed = manifest.get("members")
    if not isinstance(listed, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and _SHA256.fullmatch(v["sha256"])
            and _is_int(v.get("size"), 0) for v in listed.values()):
        raise _fail(path, MANIFEST, "'members' must map each member to its sha256 (64 hex digits) and size")
    for name in REQUIRED_MEMBERS:
        if name not in listed:
            raise _fail(path, name, "is not listed in the manifest")
    for name in listed:
        if name not in REQUIRED_MEMBERS + GENERATOR_MEMBERS and not _TRT_PLAN.fullmatch(name):
            raise _fail(path, name, "is listed in the manifest but is not a known member")
    for name in infos:
        if name != MANIFEST and name not in listed:
            raise _fail(path, name, "is in the archive but not in the manifest (added after export?)",
                        "do not use this file; re-export it")
    for name in listed:
        if name not in infos:
            raise _fail(path, name, "is listed in the manifest but missing from the archive")
        if infos[name].file_size != listed[name]["size"]:
            raise _fail(path, name, f"is {infos[name].file_size} bytes, the manifest says {listed[name]['size']}",
                        "copy the file again or re-export it")
    return manifest


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, EOFError, OSError) as e:  # a CRC that does not match, a bad local header
        raise _fail(path, info.filename, f"cannot be read from the archive ({e.__class__.__name__}: {e}): the file "
                                         f"is truncated or damaged", "copy it again or re-export it") from None
    except UnicodeDecodeError as e:
        raise _fail(path, info.filename, f"cannot be read from the archive: its local header's name is flagged "
                                         f"UTF-8 but is not ({e}): the file is damaged",
                    "copy it again or re-export it") from None


def _read_members(path: Path, archive: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo],
                  manifest: dict[str, Any]) -> dict[str, bytes]:
    members = {}
    for name, expected in manifest["members"].items():
        data = _read_member(path, archive, infos[name])
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise _fail(path, name, "sha256 does not match the manifest (corrupted or modified)",
                        "copy the file again or re-export it")
        members[name] = data
    return members


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _pair(path: Path, manifest: dict, key: str) -> tuple[int, int]:
    value = manifest.get(key)
    if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v, 1) for v in value)):
        raise _fail(path, MANIFEST, f"{key!r} must be two positive integers, got {value!r}")
    return int(value[0]), int(value[1])


def _build(path: Path, manifest: dict[str, Any], members: dict[str, bytes]) -> Bundle:
    image_size, grid = _pair(path, manifest, "image_size"), _pair(path, manifest, "grid")
    f = manifest.get("downsample")
    if not _is_int(f, 1) or (grid[0] * f, grid[1] * f) != image_size:
        raise _fail(path, MANIFEST, f"image_size {image_size}, grid {grid} and downsample {f!r} disagree")
    k, d = manifest.get("codebook_size"), manifest.get("codebook_dim")
    if not (_is_int(k, 1) and _is_int(d, 1)):
        raise _fail(path, MANIFEST, f"codebook_size and codebook_dim must be positive integers, got {k!r}, {d!r}")
    metric = manifest.get("metric")
    if metric not in METRICS:
        raise _fail(path, MANIFEST, f"metric must be one of {METRICS}, got {metric!r}")
    codebook = _load_codebook(path, members["codebook.npy"], (k, d))
    dynamic = manifest.get("dynamic_size", False)
    if not isinstance(dynamic, bool):
        raise _fail(path, MANIFEST, f"'dynamic_size' must be true or false, got {dynamic!r}")
    reason = manifest.get("fixed_size_reason", "" if dynamic else "it was exported by a fullvq without dynamic sizes")
    return Bundle(path, image_size, f, grid, metric, codebook, members, _trt_plans(path, manifest, members),
                  manifest, _generator(path, manifest, members, k, None if dynamic else grid), dynamic, str(reason))


def _generator(path: Path, manifest: dict[str, Any], members: dict[str, bytes], k: int,
               grid: tuple[int, int] | None) -> GeneratorSpec | None:
    """The generator's spec; its grid must be the tokenizer's `grid`, unless that is None (a tokenizer
    that decodes any grid)."""
    section = manifest.get("generator")
    present = [name for name in GENERATOR_MEMBERS if name in members]
    if section is None:
        if present:
            raise _fail(path, present[0], "is in the bundle but the manifest has no 'generator' section")
        return None
    for name in GENERATOR_MEMBERS:
        if name not in members:
            raise _fail(path, name, "is missing, but the manifest has a 'generator' section")
    fields = ("vocab_size", "num_classes", "null_class", "layers", "heads", "head_dim", "seq_len")
    if not isinstance(section, dict) or not all(_is_int(section.get(key), 1) for key in fields):
        raise _fail(path, MANIFEST, f"'generator' needs positive integers {list(fields)}, got {section!r}")
    spec = GeneratorSpec(grid=_pair(path, section, "grid"), **{key: int(section[key]) for key in fields})
    if spec.seq_len != spec.grid[0] * spec.grid[1]:
        raise _fail(path, MANIFEST, f"the generator's sequence length {spec.seq_len} is not its grid {spec.grid}'s")
    if spec.vocab_size != k or grid not in (None, spec.grid):
        raise _fail(path, MANIFEST, f"the generator's vocabulary {spec.vocab_size} and grid {spec.grid} do not "
                                    f"match the tokenizer's {k} codes" + (f" in a {grid} grid" if grid else ""))
    if spec.null_class != spec.num_classes:
        raise _fail(path, MANIFEST, f"the generator's null class must be {spec.num_classes} (one past the last "
                                    f"class), got {spec.null_class}")
    return spec


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _load_codebook(path: Path, data: bytes, shape: tuple[int, int]) -> np.ndarray:
    # The header first: np.load allocates whatever shape the header declares, before it finds that
    # the data is short.
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version not in _NPY_HEADERS:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        found, _, dtype = _NPY_HEADERS[version](buffer)
        if dtype.hasobject:
            raise ValueError("object arrays are refused")
    except Exception as e:  # noqa: BLE001 - numpy's header parser fails in many ways on hostile bytes:
        # ValueError, tokenize's TokenError and IndentationError, RecursionError (found by bench/fuzz_bundle.py)
        raise _fail(path, "codebook.npy", f"is not a readable .npy array ({type(e).__name__}: {e})") from None
    if dtype != np.float32 or found != shape:
        raise _fail(path, "codebook.npy", f"is {dtype} {found}, the manifest says float32 {shape}")
    if len(data) - buffer.tell() != 4 * shape[0] * shape[1]:
        raise _fail(path, "codebook.npy", f"holds {len(data) - buffer.tell()} bytes of values, float32 {shape} "
                                          f"is {4 * shape[0] * shape[1]}")
    codebook = np.load(io.BytesIO(data), allow_pickle=False)
    if not np.isfinite(codebook).all():
        raise _fail(path, "codebook.npy", "holds NaN or Inf")
    for start in range(0, shape[0], 8192):  # the lookup (fullvq_rt.Codebook) refuses larger rows
        rows = codebook[start:start + 8192].astype(np.float64)
        norms = np.einsum("kd,kd->k", rows, rows)
        if not (norms <= MAX_SQUARED_NORM).all():
            row = int(np.argmax(norms > MAX_SQUARED_NORM))
            raise _fail(path, "codebook.npy", f"row {start + row} has squared norm {norms[row]:.3g} > "
                                              f"{MAX_SQUARED_NORM:.0e}, which overflows float32 distances")
    codebook.flags.writeable = False
    return codebook


def _trt_plans(path: Path, manifest: dict[str, Any], members: dict[str, bytes]) -> dict[str, TrtPlans]:
    section = manifest.get("trt", {})
    if not isinstance(section, dict):
        raise _fail(path, MANIFEST, "'trt' must be an object")
    plans = {}
    for arch, entry in section.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("tensorrt"), str)
              and entry.get("precision") in ("fp32", "fp16", "bf16")
              and isinstance(entry.get("batch"), list) and len(entry["batch"]) == 3
              and all(_is_int(b, 1) for b in entry["batch"]) and sorted(entry["batch"]) == entry["batch"])
        if not ok:
            raise _fail(path, MANIFEST, f"trt entry {arch!r} needs tensorrt (version), precision and batch "
                                        f"[min, opt, max], got {entry!r}")
        for key in ("hardware_compatibility", "gpu"):
            if not isinstance(entry.get(key, ""), str):
                raise _fail(path, MANIFEST, f"trt entry {arch!r}: {key!r} must be a string, got {entry[key]!r}")
        for net in ("encoder", "decoder"):
            if f"trt/{arch}/{net}.plan" not in members:
                raise _fail(path, f"trt/{arch}/{net}.plan", "is missing for the manifest's trt entry")
        plans[arch] = TrtPlans(arch, entry["tensorrt"], entry["precision"], tuple(entry["batch"]),
                               _trt_size(path, manifest, arch, entry),
                               entry.get("hardware_compatibility", "none"), entry.get("gpu", ""))
    for name in members:
        match = _TRT_PLAN.fullmatch(name)
        if match and match.group(1) not in plans:
            raise _fail(path, name, "has no trt entry in the manifest")
    return plans


def _trt_size(path: Path, manifest: dict[str, Any], arch: str,
              entry: dict[str, Any]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """A trt entry's size profile, [[H, W] min, opt, max] in pixels, each a multiple of the
    downsampling factor; bundles that predate the field were built for image_size only."""
    image_size = _pair(path, manifest, "image_size")
    if "size" not in entry:
        return (image_size,) * 3
    value, f = entry["size"], manifest.get("downsample")
    ok = (isinstance(value, list) and len(value) == 3
          and all(isinstance(p, list) and len(p) == 2 and all(_is_int(v, 1) for v in p) for p in value))
    if ok:
        (h0, w0), (h1, w1), (h2, w2) = value
        ok = h0 <= h1 <= h2 and w0 <= w1 <= w2 and (not _is_int(f, 1) or all(v % f == 0 for p in value for v in p))
    if not ok:
        raise _fail(path, MANIFEST, f"trt entry {arch!r}: 'size' must be [[H, W] min, opt, max] in pixels, "
                                    f"min <= opt <= max, multiples of the downsampling factor {f}; got {value!r}")
    return tuple((int(h), int(w)) for h, w in value)


def describe(bundle: Bundle) -> str:
    """One line: image size, grid, codebook, generator and plans."""
    k, d = bundle.codebook.shape
    plans = ", ".join(f"{p.arch} TensorRT {p.tensorrt} {p.precision} (batch {p.batch[0]}-{p.batch[2]}, "
                      f"{p.size[0][0]}x{p.size[0][1]} to {p.size[2][0]}x{p.size[2][1]} px)"
                      for p in bundle.trt.values()) or "none"
    g = bundle.generator
    generator = (f"; generator: {g.layers} layers x {g.heads} heads, {g.num_classes} classes, {g.grid[0]}x{g.grid[1]} "
                 f"tokens ({g.grid[0] * bundle.downsample}x{g.grid[1] * bundle.downsample} px)" if g else "")
    return (f"{bundle.path.name}: {bundle.image_size[0]}x{bundle.image_size[1]} images -> "
            f"{bundle.grid[0]}x{bundle.grid[1]} tokens of {k} codes (dim {d}, {bundle.metric}, "
            f"{math.log2(k):.1f} bits){generator}; TensorRT plans: {plans}")
