"""Triton-only checks (tunecomp.kernels): availability rules and the GPU config sets. The
numerical battery, shared with the other backends, is tests/test_kernels.py."""

import os

import torch

# Triton picks interpreter or compiler when kernels are decorated: decide before any import
# of triton (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

kernels = pytest.importorskip("tunecomp.kernels")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def test_unavailable_reason():
    assert kernels.unavailable_reason(DEVICE, torch.float64) is not None
    assert kernels.unavailable_reason(DEVICE, torch.int32) is not None
    assert kernels.unavailable_reason(torch.device("meta"), torch.float32) is not None
    if not CUDA:
        assert kernels.unavailable_reason("cpu", torch.float32) is None
        assert "bfloat16" in kernels.unavailable_reason("cpu", torch.bfloat16)
    else:
        assert kernels.unavailable_reason("cuda", torch.bfloat16) is None


@pytest.mark.parametrize("rank", [1, 7, 64, 128, 200, 256, 384])
def test_config_pruning_keeps_a_config_for_every_rank(rank):
    """The GPU config sets (checked here without a GPU): large ranks keep only thin tiles, and
    pruning never leaves the autotuner empty."""
    from tunecomp.kernels import blended_lowrank, masked_lowrank

    for gpu_configs in (masked_lowrank.FORWARD_GPU_CONFIGS,
                        blended_lowrank.BLENDED_FORWARD_GPU_CONFIGS):
        kept = masked_lowrank.prune_by_registers(gpu_configs, {"rank": rank})
        assert kept
        if rank > 256:
            assert all(c.kwargs["BLOCK_K"] == 16 for c in kept)
