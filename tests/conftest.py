import os

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter, which must be chosen before
# any kernel module is imported. On a GPU, one config per kernel instead of autotuning every
# test shape (see kernels/masked_lowrank.py; TUNECOMP_TRITON_ONE_CONFIG=0 tunes as in use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("TUNECOMP_TRITON_ONE_CONFIG", "1")


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (NaN anywhere gives NaN: never passes)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def random_mask(shape, keep: float, device="cpu") -> torch.Tensor:
    """A bool mask keeping about ``keep`` of the entries (fresh randomness every call)."""
    return torch.rand(shape, device=device) < keep


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
