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


def pytest_collection_modifyitems(config, items):
    """TUNECOMP_TEST_SHARD=i/n keeps every n-th collected test from the i-th on (i in 0..n-1),
    so that n processes run the suite between them: benchmarks/gpu_check.sh does this on a
    GPU, where compiling Triton kernels (one CPU core per process) is most of the time."""
    shard = os.environ.get("TUNECOMP_TEST_SHARD")
    if not shard:
        return
    try:
        index, count = (int(part) for part in shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"TUNECOMP_TEST_SHARD must be i/n with 0 <= i < n; got {shard!r}") from None
    kept = items[index::count]
    config.hook.pytest_deselected(items=[item for position, item in enumerate(items) if position % count != index])
    items[:] = kept
