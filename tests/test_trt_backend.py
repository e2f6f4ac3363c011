"""The TensorRT side of export and runtime, without TensorRT: fake `tensorrt` modules shaped like
TensorRT 10 (builder precision flags) and 11 (strongly typed only), a fake CUDA runtime whose
"device" memory is host memory, and the fp16 graphs checked for real in ONNX Runtime.
The one test that needs TensorRT and a GPU is marked `trt` and skips without them."""

from __future__ import annotations

import ctypes
import importlib.util
import json
import re
import sys
import threading
import types
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundle_factory import bundle_parts
from onnx import TensorProto

import fullvq_rt.backends.trt as trt_backend
from fullvq_rt.backends import open_backend
from fullvq_rt.bundle import EngineError, read_bundle, write_bundle

trt_build = pytest.importorskip("fullvq.trt_build")


# ---------------------------------------------------------------------------------------------
# A fake tensorrt module. Its "plans" are JSON that says what the fake engine computes:
# encoder (B, 3, H, W) -> (B, D, H/f, W/f), out[:, c] = x[:, c % 3, ::f, ::f];
# decoder (B, D, h, w) -> (B, 3, h*f, w*f), the first three channels repeated f x f.


class _Enum(types.SimpleNamespace):
    pass


def fake_tensorrt(version: str = "10.9.0.34", half_flags: bool = True, tf32: bool = True,
                  same_cc: bool = True, strongly_typed: bool = True) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    flags = {"DEBUG": "DEBUG"}
    if half_flags:
        flags.update(FP16="FP16", BF16="BF16")
    if tf32:
        flags["TF32"] = "TF32"
    trt.BuilderFlag = _Enum(**flags)
    if strongly_typed:
        trt.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=1)
    levels = {"NONE": "NONE", "AMPERE_PLUS": "AMPERE_PLUS"}
    if same_cc:
        levels["SAME_COMPUTE_CAPABILITY"] = "SAME_COMPUTE_CAPABILITY"
    trt.HardwareCompatibilityLevel = _Enum(**levels)
    trt.TensorIOMode = _Enum(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.float32, trt.float16 = "float32", "float16"
    trt.built = []  # (network, config, plan) of every build, for the tests

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            self.severity = severity

    class Network:
        def __init__(self, flags):
            self.flags, self.graph = flags, None

        def get_input(self, i):
            return types.SimpleNamespace(name=onnx.load_from_string(self.graph).graph.input[i].name)

    class Config:
        def __init__(self):
            self.flags_set, self.flags_cleared, self.profiles = [], [], []
            self.hardware_compatibility_level = "NONE"

        def set_flag(self, flag):
            self.flags_set.append(flag)

        def clear_flag(self, flag):
            self.flags_cleared.append(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.name, self.shapes = name, (tuple(low), tuple(opt), tuple(high))

    class Builder:
        fail = False

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if Builder.fail:
                return None
            (profile,) = config.profiles
            low, _, high = profile.shapes
            plan = json.dumps({"input": profile.name, "low": low, "high": high}).encode()
            trt.built.append((network, config, plan))
            return plan

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse(self, graph):
            self.network.graph = bytes(graph)
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.Runtime = lambda logger: FakeRuntime(trt)
    return trt


class FakeRuntime:
    def __init__(self, trt):
        self.trt = trt

    def deserialize_cuda_engine(self, plan):
        return None if plan == b"corrupt" else FakeEngine(json.loads(plan), self.trt)


class FakeEngine:
    def __init__(self, spec, trt):
        self.spec, self.trt, self.num_io_tensors = spec, trt, 2
        self.dtype = trt.float32

    def get_tensor_name(self, i):
        return (self.spec["input"], "out")[i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == self.spec["input"] else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.dtype

    def create_execution_context(self):
        return FakeContext(self.spec)


class FakeContext:
    F = 4  # the downsampling factor of bundle_factory's graphs
    runs: list = []  # (input shape, stream handle) of every execution

    def __init__(self, spec):
        self.spec, self.addresses, self.shape = spec, {}, None

    def set_input_shape(self, name, shape):
        low, high = self.spec["low"], self.spec["high"]
        if name != self.spec["input"] or len(shape) != 4:
            return False
        if not all(a <= s <= b for a, s, b in zip(low, shape, high, strict=True)):
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        b, c, h, w = self.shape
        return (b, 4, h // self.F, w // self.F) if c == 3 else (b, 3, h * self.F, w * self.F)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream_handle):
        FakeContext.runs.append((self.shape, stream_handle))
        x = np.ctypeslib.as_array((ctypes.c_float * int(np.prod(self.shape))).from_address(
            self.addresses[self.spec["input"]])).reshape(self.shape)
        out = expected(x, self.F)
        ctypes.memmove(self.addresses["out"], out.ctypes.data, out.nbytes)
        return True


def expected(x: np.ndarray, f: int = 4, d: int = 4) -> np.ndarray:
    """What the fake plans compute (see fake_tensorrt)."""
    if x.shape[1] == 3:  # encoder
        return np.ascontiguousarray(np.stack([x[:, c % 3, ::f, ::f] for c in range(d)], 1), np.float32)
    return np.ascontiguousarray(x[:, :3].repeat(f, 2).repeat(f, 3), np.float32)


class FakeStream:
    def __int__(self):
        raise AssertionError("int(stream) is deprecated in cuda-bindings 13; use get_cuda_native_handle")


class FakeCudart:
    """cuda-python's runtime API, with host memory standing in for device memory."""

    def __init__(self, major=9, minor=0, name=b"NVIDIA H100 80GB HBM3\0\0\0"):
        self.props = types.SimpleNamespace(major=major, minor=minor, name=name)
        self.set_device, self.buffers = [], {}
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def cudaGetDeviceProperties(self, index):
        return 0, self.props

    def cudaSetDevice(self, index):
        self.set_device.append((threading.get_ident(), index))
        return (0,)

    def cudaMalloc(self, size):
        buffer = np.zeros(size, np.uint8)
        self.buffers[buffer.ctypes.data] = buffer
        return 0, buffer.ctypes.data

    def cudaFree(self, pointer):
        self.buffers.pop(pointer)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, size, kind, stream):
        ctypes.memmove(dst, src, size)
        return (0,)

    def cudaStreamCreate(self):
        return 0, FakeStream()

    def cudaStreamSynchronize(self, stream):
        return (0,)


@pytest.fixture
def cuda(monkeypatch):
    """The fake CUDA runtime, and cuda.bindings.utils.get_cuda_native_handle (cuda-bindings 13)."""
    runtime = FakeCudart()
    monkeypatch.setattr(trt_backend, "_cudart", lambda: runtime)
    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = lambda obj: 0xC0FFEE if isinstance(obj, FakeStream) else int(obj)
    for name, module in (("cuda", types.ModuleType("cuda")), ("cuda.bindings", types.ModuleType("cuda.bindings")),
                         ("cuda.bindings.utils", utils)):
        monkeypatch.setitem(sys.modules, name, module)
    FakeContext.runs = []
    return runtime


def use_tensorrt(monkeypatch, trt):
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def dynamic_parts(**kw):
    """bundle_factory's parts (f = 4, D = 4, 16 px), marked as graphs that take any size."""
    manifest, members = bundle_parts(**kw)
    manifest.update(dynamic_size=True, checked_sizes=[[4, 4], [16, 16], [16, 32]])
    return manifest, members


def bundle_with_plans(tmp_path, trt, precision="fp32", batch=(1, 2, 4), size=(8, 16, 32), arch="sm_90",
                      gpu="NVIDIA H100 80GB HBM3", **entry):
    """A bundle with fake plans built by build_plans (what export writes), read back."""
    manifest, members = dynamic_parts()
    profile = trt_build.size_profile(manifest, size)
    plans, built = trt_build.build_plans(trt, members, manifest, precision, batch, profile, arch, gpu)
    manifest["trt"] = {arch: {**built, **entry}}
    write_bundle(tmp_path / "plans.engine", manifest, {**members, **plans})
    return read_bundle(tmp_path / "plans.engine")


# ---------------------------------------------------------------------------------------------
# Building: flags per TensorRT version, profile, manifest entry


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt_10_keeps_builder_flags_for_half_precision(precision):
    trt = fake_tensorrt(half_flags=True)
    manifest, members = dynamic_parts()
    plans, entry = trt_build.build_plans(trt, members, manifest, precision, (1, 8, 32),
                                         trt_build.size_profile(manifest, None), "sm_86", "RTX A6000")
    assert sorted(plans) == ["trt/sm_86/decoder.plan", "trt/sm_86/encoder.plan"]
    for (network, config, _), net in zip(trt.built, ("encoder", "decoder"), strict=True):
        assert network.flags == 0 and network.graph == members[f"{net}.onnx"]  # the float32 graph, weakly typed
        assert config.flags_set == [precision.upper()] and config.flags_cleared == []
        assert config.hardware_compatibility_level == "SAME_COMPUTE_CAPABILITY"
    assert entry["typing"] == "weak" and entry["graph"] == "fp32" and "graph_parity" not in entry
    assert entry["precision"] == precision


def test_tensorrt_11_builds_a_strongly_typed_network_from_an_fp16_graph():
    trt = fake_tensorrt(version="11.4.1.2", half_flags=False)
    manifest, members = dynamic_parts()
    _, entry = trt_build.build_plans(trt, members, manifest, "fp16", (1, 8, 32),
                                     trt_build.size_profile(manifest, None), "sm_90")
    assert len(trt.built) == 2
    for network, config, _ in trt.built:
        assert network.flags == 1 << 1  # STRONGLY_TYPED
        assert config.flags_set == []  # no precision flag exists to set
        graph = onnx.load_from_string(network.graph).graph
        assert {t.data_type for t in graph.initializer} == {TensorProto.FLOAT16}
        assert [i.type.tensor_type.elem_type for i in (*graph.input, *graph.output)] == [TensorProto.FLOAT] * 2
    assert entry["typing"] == "strong" and entry["graph"] == "fp16"
    assert 0 < entry["graph_parity"]["encoder"] <= trt_build.FP16_PARITY
    assert 0 < entry["graph_parity"]["decoder"] <= trt_build.FP16_PARITY


def bf16_refused(version: str) -> str:
    """The error for bf16 on a TensorRT without BuilderFlag.BF16, as a pattern for pytest.raises."""
    return re.escape(f"TensorRT {version} has no BuilderFlag.BF16: it builds only strongly typed networks, whose "
                     f"precision is the graph's, and fullvq writes no bf16 graph: export with --precision fp16 or fp32")


def test_tensorrt_11_refuses_bf16_before_building():
    trt = fake_tensorrt(version="11.4.1.2", half_flags=False)
    manifest, members = dynamic_parts()
    with pytest.raises(trt_build.TrtBuildError, match=bf16_refused("11.4.1.2")):
        trt_build.build_plans(trt, members, manifest, "bf16", (1, 8, 32), trt_build.size_profile(manifest, None),
                              "sm_90")
    assert trt.built == []


@pytest.mark.parametrize("version,half_flags", [("10.9.0.34", True), ("11.4.1.2", False)])
def test_fp32_clears_tf32(version, half_flags):
    trt = fake_tensorrt(version=version, half_flags=half_flags)
    manifest, members = dynamic_parts()
    _, entry = trt_build.build_plans(trt, members, manifest, "fp32", (1, 8, 32),
                                     trt_build.size_profile(manifest, None), "sm_90")
    for network, config, _ in trt.built:
        assert config.flags_cleared == ["TF32"] and config.flags_set == []
        assert network.graph in (members["encoder.onnx"], members["decoder.onnx"])
    assert entry["tf32"] is False and entry["graph"] == "fp32"
    assert entry["typing"] == ("weak" if half_flags else "strong")


def test_missing_features_are_left_alone():
    trt = fake_tensorrt(tf32=False, same_cc=False, strongly_typed=False, half_flags=False)
    manifest, members = dynamic_parts()
    _, entry = trt_build.build_plans(trt, members, manifest, "fp16", (1, 8, 32),
                                     trt_build.size_profile(manifest, None), "sm_75")
    for network, config, _ in trt.built:
        assert network.flags == 0 and config.flags_cleared == [] and config.hardware_compatibility_level == "NONE"
    assert entry["hardware_compatibility"] == "none" and entry["tf32"] is None


def test_profile_covers_batch_and_size_and_the_decoder_in_tokens():
    trt = fake_tensorrt()
    manifest, members = dynamic_parts()
    profile = trt_build.size_profile(manifest, (8, 16, 64))
    _, entry = trt_build.build_plans(trt, members, manifest, "fp32", (2, 8, 32), profile, "sm_90", "GPU")
    (_, enc, _), (_, dec, _) = trt.built
    assert enc.profiles[0].name == "x" and enc.profiles[0].shapes == ((2, 3, 8, 8), (8, 3, 16, 16), (32, 3, 64, 64))
    assert dec.profiles[0].shapes == ((2, 4, 2, 2), (8, 4, 4, 4), (32, 4, 16, 16))
    assert entry == {"tensorrt": "10.9.0.34", "precision": "fp32", "batch": [2, 8, 32],
                     "size": [[8, 8], [16, 16], [64, 64]], "typing": "weak", "graph": "fp32", "tf32": False,
                     "hardware_compatibility": "same_compute_capability", "gpu": "GPU"}


def test_size_profile_defaults_and_errors():
    manifest, _ = dynamic_parts()  # f = 4, 16 px
    assert trt_build.size_profile(manifest, None) == ((4, 4), (16, 16), (32, 32))
    manifest["image_size"], manifest["grid"] = [16, 24], [4, 6]
    assert trt_build.size_profile(manifest, None) == ((4, 4), (16, 24), (48, 48))
    with pytest.raises(ValueError, match=r"--trt-size 4:18:32: 18 is not a multiple of the downsampling factor 4 "
                                         r"\(use 16 or 20\)"):
        trt_build.size_profile(manifest, (4, 18, 32))
    with pytest.raises(ValueError, match="1 <= MIN <= OPT <= MAX"):
        trt_build.size_profile(manifest, (8, 4, 32))
    fixed, _ = bundle_parts()  # no dynamic_size: an older or fixed-size export
    assert trt_build.size_profile(fixed, None) == ((16, 16),) * 3
    assert trt_build.size_profile(fixed, (16, 16, 16)) == ((16, 16),) * 3
    fixed["fixed_size_reason"] = "attention with a fixed position table"
    with pytest.raises(ValueError, match=r"take only 16x16 images \(attention with a fixed position table\); "
                                         r"drop --trt-size or pass 16:16:16"):
        trt_build.size_profile(fixed, (4, 16, 64))


def test_a_failed_build_names_the_network_and_settings():
    trt = fake_tensorrt()
    trt.Builder.fail = True
    manifest, members = dynamic_parts()
    with pytest.raises(trt_build.TrtBuildError, match=r"failed to build the encoder plan \(fp16, weakly typed, "
                                                      r"hardware compatibility same_compute_capability"):
        trt_build.build_plans(trt, members, manifest, "fp16", (1, 8, 32), trt_build.size_profile(manifest, None),
                              "sm_90")


def test_export_build_trt_plans_writes_a_readable_entry(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")
    from fullvq import export as export_module

    trt = use_tensorrt(monkeypatch, fake_tensorrt(version="11.0.0.9", half_flags=False))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA RTX PRO 6000")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert export_module.tensorrt_unavailable() == ""
    manifest, members = dynamic_parts()
    exported = export_module.Exported(members=members, manifest=manifest)
    export_module.build_trt_plans(exported, "fp16", (1, 4, 8), (4, 16, 32))  # the default precision, on TRT 11
    assert len(trt.built) == 2
    write_bundle(tmp_path / "x.engine", exported.manifest, exported.members)
    plans = read_bundle(tmp_path / "x.engine").trt["sm_120"]
    assert (plans.tensorrt, plans.precision, plans.batch) == ("11.0.0.9", "fp16", (1, 4, 8))
    assert plans.size == ((4, 4), (16, 16), (32, 32))
    assert (plans.hardware_compatibility, plans.gpu) == ("same_compute_capability", "NVIDIA RTX PRO 6000")
    with pytest.raises(export_module.ExportError, match="not a multiple of the downsampling factor 4"):
        export_module.build_trt_plans(exported, "fp16", (1, 4, 8), (6, 16, 32))
    with pytest.raises(export_module.ExportError, match=bf16_refused("11.0.0.9")):
        export_module.build_trt_plans(exported, "bf16", (1, 4, 8), (4, 16, 32))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version="8.6.1"))
    assert "older than 10" in export_module.tensorrt_unavailable()


def test_bf16_on_tensorrt_11_is_a_clean_command_line_error(monkeypatch, tmp_path, tiny_engine):
    torch = pytest.importorskip("torch")
    from fullvq import export as export_module

    sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
    try:
        import cli
    finally:
        sys.path.pop(0)
    trt = use_tensorrt(monkeypatch, fake_tensorrt(version="11.4.1.2", half_flags=False))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    # a GPU "is present" for the TensorRT step only: torch's ONNX export on a CPU-only torch fails when
    # torch.cuda.is_available() says True
    monkeypatch.setattr(export_module, "tensorrt_unavailable", lambda: "")

    def no_graph_export(*args, **kwargs):
        raise AssertionError("bf16 on TensorRT 11 should be refused before the ONNX export")

    monkeypatch.setattr(export_module, "export_graphs", no_graph_export)
    out = tmp_path / "bf16.engine"
    with pytest.raises(SystemExit) as exit_:
        cli.main(False, [str(tiny_engine[0]), "-o", str(out), "--precision", "bf16"])
    assert isinstance(exit_.value.code, str) and re.fullmatch("export: " + bf16_refused("11.4.1.2"), exit_.value.code)
    assert trt.built == [] and not out.exists()


def test_trt_size_flag_is_validated_by_the_command_line():
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
    try:
        import cli
    finally:
        sys.path.pop(0)
    assert cli.size_range("16:256:512") == (16, 256, 512)
    for bad in ("16:256", "512:256:16", "a:b:c", "0:4:8"):
        with pytest.raises(Exception, match="MIN:OPT:MAX pixels per side"):
            cli.size_range(bad)


# ---------------------------------------------------------------------------------------------
# The bundle's trt entry


def test_bundle_reads_size_profiles_and_defaults_old_entries(tmp_path):
    manifest, members = bundle_parts()
    plans = {"trt/sm_90/encoder.plan": b"e", "trt/sm_90/decoder.plan": b"d"}
    manifest["trt"] = {"sm_90": {"tensorrt": "10.3.0", "precision": "fp16", "batch": [1, 8, 32]}}
    write_bundle(tmp_path / "old.engine", manifest, {**members, **plans})
    old = read_bundle(tmp_path / "old.engine").trt["sm_90"]
    assert old.size == ((16, 16),) * 3 and old.hardware_compatibility == "none" and old.gpu == ""
    for size, problem in (([[4, 4], [16, 16]], "'size' must be"), ([[8, 8], [4, 4], [16, 16]], "'size' must be"),
                          ([[6, 6], [16, 16], [32, 32]], "multiples of the downsampling factor 4")):
        manifest["trt"]["sm_90"]["size"] = size
        write_bundle(tmp_path / "bad.engine", manifest, {**members, **plans})
        with pytest.raises(EngineError, match=problem):
            read_bundle(tmp_path / "bad.engine")


# ---------------------------------------------------------------------------------------------
# Runtime: versions, fallback, profile checks, device per thread, stream handle


def test_plans_from_another_patch_release_are_refused(monkeypatch, tmp_path, cuda):
    bundle = bundle_with_plans(tmp_path, fake_tensorrt(version="10.9.0.34"))
    use_tensorrt(monkeypatch, fake_tensorrt(version="10.9.0.40"))  # same major.minor, other patch/build
    usable, reason = trt_backend.tensorrt_status(bundle, 0)
    assert not usable and "10.9.0.34" in reason and "10.9.0.40" in reason and "re-export" in reason
    with pytest.raises(EngineError, match=r"cannot use TensorRT: .*TensorRT 10\.9\.0\.34.*TensorRT 10\.9\.0\.40.*"
                                          r"re-export"):
        open_backend(bundle, "cuda", "tensorrt", 1)
    with pytest.warns(RuntimeWarning, match=r"using ONNX Runtime, not the bundle's TensorRT plans: .*10\.9\.0\.34"):
        backend = open_backend(bundle, "auto", "auto", 1)
    assert backend.name == "onnxruntime"
    use_tensorrt(monkeypatch, fake_tensorrt(version="10.9.0.34"))
    assert trt_backend.tensorrt_status(bundle, 0) == (True, "")


def test_auto_falls_back_with_a_warning_when_a_plan_does_not_load(monkeypatch, tmp_path, cuda):
    bundle = bundle_with_plans(tmp_path, use_tensorrt(monkeypatch, fake_tensorrt()))
    bundle.members["trt/sm_90/decoder.plan"] = b"corrupt"
    with pytest.raises(EngineError, match="cannot deserialise the plan; re-export"):
        open_backend(bundle, "cuda", "tensorrt", 1)
    with pytest.warns(RuntimeWarning, match="trt/sm_90/decoder.plan.*cannot deserialise"):
        assert open_backend(bundle, "auto", "auto", 1).name == "onnxruntime"


def test_no_warning_without_plans_and_no_warning_on_cpu(monkeypatch, tmp_path, cuda, recwarn):
    manifest, members = bundle_parts()
    write_bundle(tmp_path / "none.engine", manifest, members)
    assert open_backend(read_bundle(tmp_path / "none.engine"), "auto", "auto", 1).name == "onnxruntime"
    bundle = bundle_with_plans(tmp_path, fake_tensorrt(version="10.1.0"))
    assert open_backend(bundle, "cpu", "auto", 1).name == "onnxruntime"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_gpu_model_is_checked_without_hardware_compatibility(monkeypatch, tmp_path, cuda):
    trt = use_tensorrt(monkeypatch, fake_tensorrt(same_cc=False))
    bundle = bundle_with_plans(tmp_path, trt, gpu="NVIDIA H100 PCIe")
    usable, reason = trt_backend.tensorrt_status(bundle, 0)
    assert not usable and "built on a NVIDIA H100 PCIe without hardware compatibility" in reason
    assert "this is a NVIDIA H100 80GB HBM3" in reason
    same_cc = bundle_with_plans(tmp_path, use_tensorrt(monkeypatch, fake_tensorrt()), gpu="NVIDIA H100 PCIe")
    assert trt_backend.tensorrt_status(same_cc, 0) == (True, "")
    cuda.props.major = 8
    usable, reason = trt_backend.tensorrt_status(same_cc, 0)
    assert not usable and "no plans for this GPU (NVIDIA H100 80GB HBM3, sm_80)" in reason


def test_encode_and_decode_run_the_plans_on_the_device_of_every_thread(monkeypatch, tmp_path, cuda):
    bundle = bundle_with_plans(tmp_path, use_tensorrt(monkeypatch, fake_tensorrt()))
    backend = open_backend(bundle, "cuda:3", "tensorrt", None)
    assert backend.name == "tensorrt" and backend.device == "cuda:3"
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    results = {}
    thread = threading.Thread(target=lambda: results.update(z=backend.encode(x), ident=threading.get_ident()))
    thread.start()
    thread.join()
    np.testing.assert_array_equal(results["z"], expected(x))
    assert (results["ident"], 3) in cuda.set_device  # set in the calling thread, not only in the constructor
    z = np.random.default_rng(1).standard_normal((1, 4, 2, 8)).astype(np.float32)
    np.testing.assert_array_equal(backend.decode(z), expected(z))
    assert [handle for _, handle in FakeContext.runs] == [0xC0FFEE, 0xC0FFEE]  # get_cuda_native_handle
    assert cuda.buffers == {}  # every device buffer freed


def test_stream_handle_falls_back_to_int_on_older_cuda_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)  # the import fails, as before cuda-python 12.9
    class OldStream:  # cuda-python 12's cudaStream_t: int() gives the handle
        def __int__(self):
            return 77

    assert trt_backend._native_handle(OldStream()) == 77
    handles = types.ModuleType("cuda.bindings.utils")
    handles.get_cuda_native_handle = lambda obj: 1234
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", handles)
    assert trt_backend._native_handle(FakeStream()) == 1234  # never int(stream), which FakeStream refuses


def test_batches_above_the_profile_run_in_slices(monkeypatch, tmp_path, cuda):
    bundle = bundle_with_plans(tmp_path, use_tensorrt(monkeypatch, fake_tensorrt()), batch=(2, 2, 4))
    backend = open_backend(bundle, "cuda", "tensorrt", None)
    x = np.random.default_rng(2).uniform(-1, 1, (10, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(backend.encode(x), expected(x))
    assert [shape[0] for shape, _ in FakeContext.runs] == [4, 3, 3]  # none above 4, none below 2
    narrow = bundle_with_plans(tmp_path, fake_tensorrt(), batch=(3, 4, 4))
    with pytest.raises(ValueError, match=r"got images of shape \(2, 3, 16, 16\): re-export with --batch 2:4:4"):
        open_backend(narrow, "cuda", "tensorrt", None).encode(x[:5])  # slices of 3 and 2: 2 is below 3


def test_shapes_outside_the_profile_say_which_export_covers_them(monkeypatch, tmp_path, cuda):
    bundle = bundle_with_plans(tmp_path, use_tensorrt(monkeypatch, fake_tensorrt()), batch=(2, 4, 8),
                               size=(8, 16, 32))
    backend = open_backend(bundle, "cuda", "tensorrt", None)
    with pytest.raises(ValueError, match=r"take batches of 2 to 8 and images of 8x8 to 32x32 pixels; got images of "
                                         r"shape \(1, 3, 16, 16\): re-export with --batch 1:4:8, or use "
                                         r"backend='onnxruntime'"):
        backend.encode(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 64, 16\): re-export with --trt-size 8:16:64, or use "
                                         r"backend='onnxruntime'"):
        backend.encode(np.zeros((2, 3, 64, 16), np.float32))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 16\): re-export with --trt-size 4:16:32"):
        backend.encode(np.zeros((2, 3, 4, 16), np.float32))
    with pytest.raises(ValueError, match=r"codes of shape \(2, 4, 1, 12\) \(images of 4x48 pixels\): re-export "
                                         r"with --trt-size 4:16:48"):
        backend.decode(np.zeros((2, 4, 1, 12), np.float32))
    with pytest.raises(ValueError, match=r"--batch 1:4:8 --trt-size"):
        backend.encode(np.zeros((1, 3, 64, 64), np.float32))
    assert FakeContext.runs == []  # nothing reached TensorRT


def test_set_input_shape_refusal_is_an_error(monkeypatch, tmp_path, cuda):
    bundle = bundle_with_plans(tmp_path, use_tensorrt(monkeypatch, fake_tensorrt()))
    backend = open_backend(bundle, "cuda", "tensorrt", None)
    backend.engines["encoder"].context.spec["high"] = [4, 3, 16, 16]  # a plan narrower than its manifest says
    with pytest.raises(ValueError, match=r"trt/sm_90/encoder.plan: TensorRT rejects input shape \(2, 3, 32, 32\)"):
        backend.encode(np.zeros((2, 3, 32, 32), np.float32))
    assert cuda.buffers == {}


def test_plans_with_half_inputs_are_refused(monkeypatch, tmp_path, cuda):
    trt = use_tensorrt(monkeypatch, fake_tensorrt())
    bundle = bundle_with_plans(tmp_path, trt)
    monkeypatch.setattr(FakeEngine, "get_tensor_dtype", lambda self, name: "float16")
    with pytest.raises(EngineError, match="tensor 'x' is float16, not float32; re-export"):
        trt_backend.TensorRTBackend(bundle, 0)


# ---------------------------------------------------------------------------------------------
# fp16 ONNX graphs (onnxconverter-common), checked in ONNX Runtime


def test_fp16_graph_of_the_tiny_model_matches_its_fp32_graph(tiny_engine):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(tiny_engine[1]) as z:
        graphs = {net: z.read(f"{net}.onnx") for net in ("encoder", "decoder")}
        d = int(json.loads(z.read("manifest.json"))["codebook_dim"])
    shapes = {"encoder": [(2, 3, 16, 16), (1, 3, 4, 4), (2, 3, 16, 32)],
              "decoder": [(2, d, 4, 4), (1, d, 1, 1), (2, d, 4, 8)]}
    for net, graph in graphs.items():
        for shape in shapes[net]:
            example = (rng.uniform(-1, 1, shape) if net == "encoder" else rng.standard_normal(shape))
            half, error = trt_build.fp16_graph(graph, example.astype(np.float32), net)
            assert 1e-5 < error <= trt_build.FP16_PARITY, (net, shape, error)  # really fp16, and close
        model = onnx.shape_inference.infer_shapes(onnx.load_from_string(half)).graph
        assert [v.type.tensor_type.elem_type for v in (*model.input, *model.output)] == [TensorProto.FLOAT] * 2
        assert TensorProto.FLOAT16 in {t.data_type for t in model.initializer}
        types = {v.name: v.type.tensor_type.elem_type for v in (*model.input, *model.value_info)}
        types.update({t.name: t.data_type for t in model.initializer})
        norms = [n for n in model.node if n.op_type in ("InstanceNormalization", "GroupNormalization",
                                                         "LayerNormalization")]
        assert norms, net  # the tiny model's GroupNorms export as InstanceNormalization
        for node in norms:  # normalisation stays float32
            assert [types[i] for i in node.input if i] == [TensorProto.FLOAT] * len([i for i in node.input if i])
        convs = [n for n in model.node if n.op_type == "Conv"]
        assert convs and all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs)  # and the rest is fp16


def test_fp16_graph_check_fails_when_the_copy_drifts(monkeypatch):
    from onnx import numpy_helper
    from onnxconverter_common import float16

    _, members = dynamic_parts()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    half, error = trt_build.fp16_graph(members["encoder.onnx"], x, "encoder")
    assert 0 < error < 1e-2
    convert = float16.convert_float_to_float16

    def wrong(model, **kw):  # a converter that changes one weight by 5%
        model = convert(model, **kw)
        w = model.graph.initializer[0]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float16(1.05), w.name))
        return model

    monkeypatch.setattr(float16, "convert_float_to_float16", wrong)
    with pytest.raises(trt_build.TrtBuildError, match=r"the fp16 copy of encoder.onnx differs from the float32 graph "
                                                      r"by [45]\.\d\de-02 \(relative\), over 1e-02: export with "
                                                      r"--precision fp32"):
        trt_build.fp16_graph(members["encoder.onnx"], x, "encoder")
    monkeypatch.setattr(float16, "convert_float_to_float16", convert)
    monkeypatch.setattr(trt_build, "FP16_PARITY", error / 2)  # a tolerance tighter than the real copy meets
    with pytest.raises(trt_build.TrtBuildError, match="the fp16 copy of encoder.onnx differs"):
        trt_build.fp16_graph(members["encoder.onnx"], x, "encoder")


# ---------------------------------------------------------------------------------------------
# With TensorRT and a GPU


@pytest.mark.trt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_tensorrt_plans_match_onnxruntime(tmp_path, precision):
    import tensorrt

    try:
        arch, name = trt_backend.gpu_properties(0)
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"needs a CUDA GPU through cuda-python ({e})")
    manifest, members = dynamic_parts()
    profile = trt_build.size_profile(manifest, (4, 16, 32))
    plans, entry = trt_build.build_plans(tensorrt, members, manifest, precision, (1, 2, 4), profile, arch, name)
    manifest["trt"] = {arch: entry}
    write_bundle(tmp_path / "real.engine", manifest, {**members, **plans})
    bundle = read_bundle(tmp_path / "real.engine")
    gpu, cpu = open_backend(bundle, "cuda", "tensorrt", None), open_backend(bundle, "cpu", "onnxruntime", 1)
    tolerance = 1e-4 if precision == "fp32" else 1e-2
    for shape in ((1, 3, 16, 16), (6, 3, 8, 32), (2, 3, 4, 4)):
        x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
        want = cpu.encode(x)
        assert np.abs(gpu.encode(x) - want).max() <= tolerance * np.abs(want).max()
        z = want
        assert np.abs(gpu.decode(z) - cpu.decode(z)).max() <= tolerance * np.abs(cpu.decode(z)).max()
