"""ONNX Runtime: the bundle's ONNX graphs on the CPU or CUDA execution provider."""

from __future__ import annotations

import numpy as np

from ..bundle import Bundle, EngineError


def _sessions(bundle: Bundle, members: tuple[str, ...], kind: str, index: int, num_threads: int | None) -> tuple:
    """({member: InferenceSession}, device) for `members` of the bundle."""
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
    sessions = {}
    for member in members:
        try:
            sessions[member] = ort.InferenceSession(bundle.members[member], options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for invalid models
            raise EngineError(f"{bundle.path}: member {member!r}: ONNX Runtime cannot load it "
                              f"({str(e).splitlines()[0]}); re-export the checkpoint") from None
    active = sessions[members[0]].get_providers()[0]
    return sessions, f"cuda:{index}" if active == "CUDAExecutionProvider" else "cpu"


class OnnxRuntimeBackend:
    """The tokenizer's encoder and decoder."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, kind: str, index: int, num_threads: int | None):
        sessions, self.device = _sessions(bundle, ("encoder.onnx", "decoder.onnx"), kind, index, num_threads)
        self.encoder, self.decoder = sessions["encoder.onnx"], sessions["decoder.onnx"]

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {self.encoder.get_inputs()[0].name: x})[0]

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self.decoder.run(None, {self.decoder.get_inputs()[0].name: z})[0]


class OnnxRuntimeGenerator:
    """The generator's prefill and decode-step graphs (fullvq.export_gpt documents their inputs)."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, kind: str, index: int, num_threads: int | None):
        sessions, self.device = _sessions(bundle, ("generator/prefill.onnx", "generator/decode.onnx"), kind, index,
                                          num_threads)
        self.prefill_session, self.decode_session = sessions["generator/prefill.onnx"], sessions["generator/decode.onnx"]
        self.inputs = bundle.generator.decode_inputs
        found = [i.name for i in self.decode_session.get_inputs()]
        if found != self.inputs:
            raise EngineError(f"{bundle.path}: member 'generator/decode.onnx' takes inputs {found[:4]}..., not the "
                              f"per-layer KV cache this runtime passes ({self.inputs[:4]}...): it was exported by "
                              f"another fullvq version; re-export the generator")
        self._pos = np.zeros(1, np.int64)

    def prefill(self, labels: np.ndarray) -> list[np.ndarray]:
        """labels (R,) int64 -> [logits (R, V), k (L, R, H, 1, hd), v (L, R, H, 1, hd)]."""
        return self.prefill_session.run(None, {"labels": labels})

    def decode(self, token: np.ndarray, pos: int, k_cache: np.ndarray, v_cache: np.ndarray) -> list[np.ndarray]:
        """token (R,) int64 at sequence position `pos`, caches (L, R, H, T, hd) C-contiguous ->
        [logits, k, v]. Each layer of the caches goes in as a view, which ONNX Runtime reads in place."""
        self._pos[0] = pos
        return self.decode_session.run(None, dict(zip(self.inputs, (token, self._pos, *k_cache, *v_cache))))
