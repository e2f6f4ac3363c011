"""ONNX Runtime backend: the bundle's ONNX graphs, CPU or CUDA execution provider."""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle, EngineError


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, kind: str, index: int, num_threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("the ONNX Runtime backend needs onnxruntime: pip install onnxruntime "
                              "(or onnxruntime-gpu)") from None
        providers = ["CPUExecutionProvider"]
        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if kind == "cuda" and not cuda:
            raise ValueError("device='cuda' needs onnxruntime-gpu with a working CUDA provider (or a TensorRT "
                             "plan in the bundle); use device='cpu' or 'auto'")
        if kind != "cpu" and cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or 0
        self.sessions = {}
        for net in ("encoder", "decoder"):
            try:
                self.sessions[net] = ort.InferenceSession(bundle.members[f"{net}.onnx"], options, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for invalid models
                raise EngineError(f"{bundle.path}: member '{net}.onnx': ONNX Runtime cannot load it "
                                  f"({str(e).splitlines()[0]}); re-export the checkpoint") from None
        active = self.sessions["encoder"].get_providers()[0]
        self.device = f"cuda:{index}" if active == "CUDAExecutionProvider" else "cpu"
        self.inputs = {net: s.get_inputs()[0].name for net, s in self.sessions.items()}

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.sessions["encoder"].run(None, {self.inputs["encoder"]: x})[0]

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self.sessions["decoder"].run(None, {self.inputs["decoder"]: z})[0]
