"""How CUDA arrays are handed to the core (fullvq_rt.lookup), without a GPU or torch.

The core runs on the legacy default stream of the array's device, so each CUDA array must be
exported with ``__dlpack__(stream=1)`` while its device is current: the producer then orders its
pending work (a torch side stream) before that stream. Fakes stand in for CUDA arrays: they report
a CUDA device, record how ``__dlpack__`` was called and export a CPU capsule, so the core really
consumes the capsule (and computes on the CPU).
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest

import fullvq_rt

KDL_CUDA = 2


class FakeCudaArray:
    """A DLPack array that says it lives on cuda:``index``; its data is a CPU numpy array."""

    def __init__(self, host: np.ndarray, index: int = 0, error: Exception | None = None) -> None:
        self.host, self.index, self.error = host, index, error
        self.calls: list[dict] = []

    def __dlpack_device__(self) -> tuple[int, int]:
        return KDL_CUDA, self.index

    def __dlpack__(self, **kwargs):
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        return self.host.__dlpack__()


class FakeDevices:
    """The current CUDA device of a fake framework, and a context manager that switches it."""

    def __init__(self) -> None:
        self.current = 0

    @contextlib.contextmanager
    def device(self, index: int):
        previous, self.current = self.current, index
        try:
            yield
        finally:
            self.current = previous


@pytest.fixture
def fake_torch(monkeypatch):
    """A stand-in ``torch`` module (only what lookup.py touches: Tensor, cuda.device)."""
    devices = FakeDevices()

    class Tensor(FakeCudaArray):
        def __dlpack__(self, **kwargs):  # torch refuses a tensor of another device than the current
            if devices.current != self.index:
                raise BufferError("Can't export tensors on a different CUDA device index.")
            kwargs["current_device"] = devices.current
            return super().__dlpack__(**kwargs)

    module = types.ModuleType("torch")
    module.Tensor = Tensor
    module.cuda = types.SimpleNamespace(device=devices.device)
    monkeypatch.setitem(sys.modules, "torch", module)
    return module, devices


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((300, 8)).astype(np.float32)


def test_cuda_arrays_are_exported_for_the_core_stream():
    x, codebook = _data()
    fx, fc = FakeCudaArray(x), FakeCudaArray(codebook)
    indices = fullvq_rt.nearest(fx, fc)
    assert fx.calls == [{"stream": 1}] and fc.calls == [{"stream": 1}]  # 1: the legacy default stream
    np.testing.assert_array_equal(indices, fullvq_rt.nearest(x, codebook))  # the capsules were consumed

    book = fullvq_rt.Codebook(FakeCudaArray(codebook))
    fx = FakeCudaArray(x)
    np.testing.assert_array_equal(book.nearest(fx), indices)
    assert fx.calls == [{"stream": 1}]

    logits = np.random.default_rng(1).standard_normal((4, 100)).astype(np.float32)
    fl = FakeCudaArray(logits)
    tokens = fullvq_rt.sample_logits(fl, top_k=10, seed=3)
    assert fl.calls == [{"stream": 1}]
    np.testing.assert_array_equal(tokens, fullvq_rt.sample_logits(logits, top_k=10, seed=3))


def test_torch_tensor_is_exported_with_its_device_current(fake_torch):
    torch, devices = fake_torch
    x, codebook = _data(2)
    tx, tc = torch.Tensor(x, index=1), torch.Tensor(codebook, index=1)
    indices = fullvq_rt.nearest(tx, tc)
    assert tx.calls == [{"stream": 1, "current_device": 1}]
    assert tc.calls == [{"stream": 1, "current_device": 1}]
    assert devices.current == 0  # restored
    np.testing.assert_array_equal(indices, fullvq_rt.nearest(x, codebook))

    logits = np.zeros((2, 5), np.float32)
    tl = torch.Tensor(logits, index=3)
    fullvq_rt.sample_logits(tl)
    assert tl.calls == [{"stream": 1, "current_device": 3}] and devices.current == 0


def test_array_whose_device_is_a_context_manager_gets_it_entered():
    entered = []

    class Device:  # CuPy's Device: .id, and `with device:` makes it current
        def __init__(self, index: int) -> None:
            self.id = index

        def __enter__(self):
            entered.append(("enter", self.id))

        def __exit__(self, *exc):
            entered.append(("exit", self.id))

    class CupyLike(FakeCudaArray):
        def __dlpack__(self, **kwargs):
            entered.append(("export", kwargs))
            return super().__dlpack__(**kwargs)

    logits = np.zeros((2, 5), np.float32)
    array = CupyLike(logits, index=2)
    array.device = Device(2)
    fullvq_rt.sample_logits(array)
    assert entered == [("enter", 2), ("export", {"stream": 1}), ("exit", 2)]


def test_an_export_refusal_names_the_argument():
    x, codebook = _data()
    refusing = FakeCudaArray(x, error=BufferError("Can't export tensors that require gradient, use tensor.detach()"))
    with pytest.raises(ValueError, match=r"^x cannot be shared with fullvq_rt through DLPack: .*tensor\.detach\(\)"):
        fullvq_rt.nearest(refusing, FakeCudaArray(codebook))
    with pytest.raises(ValueError, match=r"^logits cannot be shared"):
        fullvq_rt.sample_logits(FakeCudaArray(x, error=BufferError("read-only")))


def test_devices_are_compared_before_the_codebook_is_exported():
    x, codebook = _data()
    fc = FakeCudaArray(codebook, index=0)
    with pytest.raises(ValueError, match=r"different devices \(x on cpu, codebook on cuda:0\): move both"):
        fullvq_rt.nearest(x, fc)
    fx = FakeCudaArray(x, index=1)
    with pytest.raises(ValueError, match=r"different devices \(x on cuda:1, codebook on cuda:0\)"):
        fullvq_rt.nearest(fx, fc)
    with pytest.raises(ValueError, match=r"different devices \(x on cuda:1, codebook on cpu\)"):
        fullvq_rt.nearest(fx, codebook)
    assert fc.calls == [] and fx.calls == []  # nothing exported, so nothing prepared on a GPU
