"""The marks of tests that need a CUDA device and a CUDA build of fullvq_rt (they skip cleanly without)."""

import pytest

import fullvq_rt


def cuda_ready() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and fullvq_rt.cuda_available()


GPU = [pytest.mark.gpu, pytest.mark.skipif(not cuda_ready(), reason="needs a CUDA device and a CUDA build of fullvq_rt")]
