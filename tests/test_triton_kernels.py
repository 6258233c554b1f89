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


@pytest.mark.skipif(CUDA, reason="with a GPU the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """Every GPU config the autotuner keeps, of every Triton kernel, compiles for an H100
    (sm_90) with this Triton, and each call has one that fits its shared memory: a GPU-only
    compile error (which the interpreter cannot show) fails here, in CI. Runs
    benchmarks/kernel_resources.py --quick (bf16, one layer shape, rank 64) in a fresh process:
    compiling needs TRITON_INTERPRET unset before the kernels are imported. It also reads the
    sm_90 kernels of a CUDA build of tunecomp._C, and fails if there are none."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"), "--quick",
         "--no-write"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "; 0 problems" in proc.stdout, proc.stdout[-3000:]
    compiled = int(proc.stdout.split("kernel compiles (")[1].split()[0])
    assert compiled >= 5, proc.stdout  # one binary per kernel at the very least
    from tunecomp import _C

    if _C.with_cuda:  # the CUDA C++ kernels were built: read for sm_90
        assert " CUDA C++ kernels;" in proc.stdout, proc.stdout
