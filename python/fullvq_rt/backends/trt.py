"""TensorRT backend: the bundle's plans for this GPU, run with the tensorrt Python API on device
buffers of its own (cuda-python's runtime API; no torch, no pycuda).

Written against NVIDIA's documented Python API of TensorRT 10.x and 11.x (named tensors,
`set_input_shape`, `execute_async_v3`) and of cuda-python 12.x / cuda-bindings 13.x; the two are
told apart by feature, not by version. Never run against a real TensorRT in fullvq's CI (it cannot
be installed there): its tests use fake `tensorrt` and CUDA runtime modules (docs/deploy.md says
what was run where).

- A plan loads only in the exact TensorRT version that built it: `tensorrt_status` compares the
  full version strings.
- The plans' optimisation profile bounds batch and image size: batches above its maximum run in
  slices, anything else outside it is a ValueError that says which export flags cover the shape.
- The CUDA current device is per thread: every call selects the backend's device first.
"""

from __future__ import annotations

import threading
from itertools import pairwise

import numpy as np

from ..bundle import Bundle, EngineError, TrtPlans


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6, cuda-bindings 13
    except ImportError:
        from cuda import cudart as runtime  # older cuda-python (the module was removed in cuda-bindings 13)
    return runtime


def _native_handle(obj) -> int:
    """The address a cuda-python object (a cudaStream_t) wraps: `get_cuda_native_handle` where
    cuda-bindings has it (`int(obj)` is deprecated from cuda-bindings 13.0), else `int(obj)`."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def _check(result):
    """cuda-python calls return (error, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return values[0] if len(values) == 1 else (values or None)


def gpu_properties(index: int) -> tuple[str, str]:
    """(compute capability as "sm_XY", the GPU's name) of CUDA device `index`."""
    props = _check(_cudart().cudaGetDeviceProperties(index))
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return f"sm_{props.major}{props.minor}", str(name).strip()


def gpu_arch(index: int) -> str:
    return gpu_properties(index)[0]


def tensorrt_status(bundle: Bundle, index: int) -> tuple[bool, str]:
    """(whether a plan in the bundle runs here, why not)."""
    if not bundle.trt:
        return False, "the bundle holds no TensorRT plans (export on a machine with TensorRT and a GPU)"
    try:
        import tensorrt
    except ImportError:
        return False, (f"the bundle has TensorRT plans ({_listing(bundle)}) but the tensorrt package is not "
                       f"installed here")
    try:
        arch, name = gpu_properties(index)
    except (ImportError, RuntimeError) as e:
        return False, f"no usable CUDA device {index} through cuda-python ({e})"
    plans = bundle.trt.get(arch)
    if plans is None:
        return False, (f"no plans for this GPU ({name}, {arch}); the bundle has {_listing(bundle)}: re-export on "
                       f"this GPU")
    here = str(getattr(tensorrt, "__version__", "unknown"))
    if plans.tensorrt != here:
        return False, (f"the {arch} plans were built by TensorRT {plans.tensorrt} and a plan loads only in the "
                       f"TensorRT version that built it; this is TensorRT {here}: re-export the checkpoint here "
                       f"(python export/to_trt.py CKPT) or install tensorrt=={plans.tensorrt}")
    if plans.hardware_compatibility != "same_compute_capability" and plans.gpu and plans.gpu != name:
        return False, (f"the {arch} plans were built on a {plans.gpu} without hardware compatibility, which "
                       f"promises them to that GPU model only; this is a {name}: re-export on this GPU")
    return True, ""


def _listing(bundle: Bundle) -> str:
    return ", ".join(f"{p.arch} TensorRT {p.tensorrt}" for p in bundle.trt.values())


def _profile_problem(plans: TrtPlans, f: int, net: str, shape: tuple[int, ...]) -> str:
    """Why `shape` is outside the plans' profile and which export covers it ("" when inside).
    Batches above the profile's maximum are not a problem: they run in slices."""
    b = shape[0]
    h, w = (shape[2], shape[3]) if net == "encoder" else (shape[2] * f, shape[3] * f)
    (h0, w0), (h1, w1), (h2, w2) = plans.size
    (b0, b1, b2) = plans.batch
    fixes = []
    if b < b0:
        fixes.append(f"--batch {b}:{max(b, b1)}:{max(b, b2)}")
    if not (h0 <= h <= h2 and w0 <= w <= w2):
        low = min(h0, w0, h, w) // f * f or f
        high = -(-max(h2, w2, h, w) // f) * f
        fixes.append(f"--trt-size {low}:{min(max(low, max(h1, w1)), high)}:{high}")
    if not fixes:
        return ""
    what = (f"images of shape {shape}" if net == "encoder"
            else f"codes of shape {shape} (images of {h}x{w} pixels)")
    return (f"the TensorRT plans ({plans.arch}) take batches of {b0} to {b2} and images of {h0}x{w0} to {h2}x{w2} "
            f"pixels; got {what}: re-export with {' '.join(fixes)}, or use backend='onnxruntime'")


class _Engine:
    """One deserialised plan with one float32 input and one float32 output tensor."""

    def __init__(self, trt, runtime, plan: bytes, member: str, path):
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"{path}: member {member!r}: TensorRT cannot deserialise the plan; re-export it")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{path}: member {member!r}: TensorRT cannot create an execution context (out of "
                              f"GPU memory for the plan's largest profile shape?); re-export with a smaller "
                              f"--batch or --trt-size")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        inputs = [n for n in names if modes[n] == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if modes[n] == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineError(f"{path}: member {member!r}: the plan has inputs {inputs} and outputs {outputs}, "
                              f"not one of each; re-export it")
        self.input, self.output = inputs[0], outputs[0]
        for name in names:
            if self.engine.get_tensor_dtype(name) != trt.float32:
                raise EngineError(f"{path}: member {member!r}: tensor {name!r} is "
                                  f"{self.engine.get_tensor_dtype(name)}, not float32; re-export it")
        self.member = member
        self.lock = threading.Lock()  # one execution context: one run at a time

    def run(self, x: np.ndarray, stream, stream_handle: int) -> np.ndarray:
        cudart = _cudart()
        x = np.ascontiguousarray(x, dtype=np.float32)
        with self.lock:
            if not self.context.set_input_shape(self.input, tuple(int(v) for v in x.shape)):
                raise ValueError(f"{self.member}: TensorRT rejects input shape {x.shape} (outside the plan's "
                                 f"optimisation profile); use backend='onnxruntime' or re-export")
            shape = tuple(int(v) for v in self.context.get_tensor_shape(self.output))
            if any(v < 0 for v in shape):
                raise RuntimeError(f"{self.member}: TensorRT left the output shape {shape} unresolved")
            out = np.empty(shape, dtype=np.float32)
            d_in = _check(cudart.cudaMalloc(max(1, x.nbytes)))
            try:
                d_out = _check(cudart.cudaMalloc(max(1, out.nbytes)))
            except BaseException:
                cudart.cudaFree(d_in)
                raise
            try:
                kind = cudart.cudaMemcpyKind
                _check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice, stream))
                self.context.set_tensor_address(self.input, int(d_in))
                self.context.set_tensor_address(self.output, int(d_out))
                if not self.context.execute_async_v3(stream_handle):
                    raise RuntimeError(f"{self.member}: TensorRT execution failed (see its log)")
                _check(cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, kind.cudaMemcpyDeviceToHost, stream))
                _check(cudart.cudaStreamSynchronize(stream))
            finally:
                cudart.cudaFree(d_in)
                cudart.cudaFree(d_out)
        return out


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, bundle: Bundle, index: int):
        import tensorrt as trt

        cudart = _cudart()
        self.index = index
        _check(cudart.cudaSetDevice(index))
        arch = gpu_arch(index)
        self.device = f"cuda:{index}"
        self.plans = bundle.trt[arch]
        self.downsample = bundle.downsample
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {net: _Engine(trt, runtime, bundle.members[f"trt/{arch}/{net}.plan"], f"trt/{arch}/{net}.plan",
                                     bundle.path) for net in ("encoder", "decoder")}
        self.stream = _check(cudart.cudaStreamCreate())
        self.stream_handle = _native_handle(self.stream)
        self.max_batch = self.plans.batch[2]

    def check_shape(self, net: str, shape: tuple[int, ...]) -> None:
        """ValueError when `shape` is outside the plans' optimisation profile (batches above its
        maximum are fine: they run in slices)."""
        problem = _profile_problem(self.plans, self.downsample, net, tuple(int(v) for v in shape))
        if problem:
            raise ValueError(problem)

    def _run(self, net: str, x: np.ndarray) -> np.ndarray:
        _check(_cudart().cudaSetDevice(self.index))  # the current device is per thread
        self.check_shape(net, x.shape)
        engine, n = self.engines[net], len(x)
        slices = -(-n // self.max_batch)
        if slices == 1:
            return engine.run(x, self.stream, self.stream_handle)
        # above the profile's maximum: run in slices of (nearly) equal size, none above the maximum
        self.check_shape(net, (n // slices, *x.shape[1:]))  # and none below the minimum
        starts = [i * (n // slices) + min(i, n % slices) for i in range(slices + 1)]
        return np.concatenate([engine.run(x[a:b], self.stream, self.stream_handle)
                               for a, b in pairwise(starts)])

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._run("encoder", x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self._run("decoder", z)
