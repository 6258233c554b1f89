"""Builds (once, cached by torch) and returns the CPU emulation of the "cuda" backend.

The kernel and host sources of csrc/ are compiled unchanged against cuda_mock.h, so the
tests can check the CUDA backend's indexing, masking, split-K and epilogue logic against the
float64 reference on a machine without a GPU. What it cannot check: timing, real wmma
fragment layouts, races between warps, and anything the compiler does for sm_80/sm_90 —
those are for the GPU tests and compute-sanitizer.
"""

import functools
import os

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(os.path.dirname(HERE)), "csrc")


@functools.lru_cache(maxsize=None)
def load():
    from torch.utils.cpp_extension import load as load_extension

    return load_extension(
        name="tunecomp_cuda_emulator",
        sources=[os.path.join(HERE, "emulator.cpp")],
        extra_include_paths=[HERE, CSRC],
        extra_cflags=["-O1", "-fno-strict-aliasing", "-pthread"],  # CUDA-style type punning
        extra_ldflags=["-pthread"],
        verbose=False,
    )
