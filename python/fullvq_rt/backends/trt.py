"""TensorRT backend: the bundle's plans for this GPU, run with the tensorrt Python API on device
buffers of its own (cuda-python's runtime API; no torch, no pycuda).

Written against the documented TensorRT 10 Python API (named tensors, `execute_async_v3`). Not run
in fullvq's CI: TensorRT cannot be installed there (docs/deploy.md says what was run where).
"""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle, EngineError


def _cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart as runtime  # older cuda-python
    return runtime


def _check(result):
    """cuda-python calls return (error, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime error {err}")
    return values[0] if len(values) == 1 else values


def gpu_arch(index: int) -> str:
    props = _check(_cudart().cudaGetDeviceProperties(index))
    return f"sm_{props.major}{props.minor}"


def tensorrt_status(bundle: Bundle, index: int) -> tuple[bool, str]:
    """(whether a plan in the bundle runs here, why not)."""
    if not bundle.trt:
        return False, "the bundle holds no TensorRT plans (export on a machine with TensorRT and a GPU)"
    try:
        import tensorrt
    except ImportError:
        return False, "the tensorrt package is not installed"
    try:
        arch = gpu_arch(index)
    except (ImportError, RuntimeError) as e:
        return False, f"no usable CUDA device {index} through cuda-python ({e})"
    plans = bundle.trt.get(arch)
    if plans is None:
        return False, f"no plans for this GPU ({arch}); the bundle has {sorted(bundle.trt)}: re-export on this GPU"
    if plans.tensorrt.split(".")[:2] != tensorrt.__version__.split(".")[:2]:
        return False, f"plans built by TensorRT {plans.tensorrt}, this is {tensorrt.__version__}: re-export"
    return True, ""


class _Engine:
    """One deserialised plan with one input and one output tensor."""

    def __init__(self, runtime, plan: bytes, member: str, path):
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"{path}: member {member!r}: TensorRT cannot deserialise the plan; re-export it")
        self.context = self.engine.create_execution_context()
        import tensorrt as trt

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)

    def run(self, x: np.ndarray, stream) -> np.ndarray:
        cudart = _cudart()
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.context.set_input_shape(self.input, x.shape)
        out = np.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=np.float32)
        d_in = _check(cudart.cudaMalloc(x.nbytes))
        d_out = _check(cudart.cudaMalloc(out.nbytes))
        try:
            h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, stream))
            self.context.set_tensor_address(self.input, int(d_in))
            self.context.set_tensor_address(self.output, int(d_out))
            if not self.context.execute_async_v3(int(stream)):
                raise RuntimeError("TensorRT execution failed")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, d2h, stream))
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
        _check(cudart.cudaSetDevice(index))
        arch = gpu_arch(index)
        self.device = f"cuda:{index}"
        self.plans = bundle.trt[arch]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {net: _Engine(runtime, bundle.members[f"trt/{arch}/{net}.plan"], f"trt/{arch}/{net}.plan",
                                     bundle.path) for net in ("encoder", "decoder")}
        self.stream = _check(cudart.cudaStreamCreate())
        self.max_batch = self.plans.batch[2]

    def _run(self, net: str, x: np.ndarray) -> np.ndarray:
        if len(x) > self.max_batch:  # the optimisation profile's limit: run in slices
            return np.concatenate([self._run(net, x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)])
        return self.engines[net].run(x, self.stream)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self._run("encoder", x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self._run("decoder", z)
