"""Builds (once, cached by torch) and returns the CPU emulation of the "cuda" backend.

The kernel and host sources of csrc/ are compiled unchanged against cuda_mock.h, so the
tests can check the CUDA backend's indexing, masking, split-K and epilogue logic against the
float64 reference on a machine without a GPU. What it cannot check: timing, real wmma
fragment layouts, races between warps, and anything the compiler does for sm_80/sm_90 —
those are for the GPU tests and compute-sanitizer.
"""

import functools
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")


@functools.lru_cache(maxsize=None)
def load():
    import torch
    from torch.utils.cpp_extension import load as load_extension

    # In this checkout's build/, one folder per torch version: torch's shared default folder
    # would make two checkouts or two venvs rebuild over each other (and wait forever on a
    # lock file that a killed build left behind).
    build_dir = os.path.join(ROOT, "build", "cuda_emulator-torch" + re.sub(r"[^\w.]+", "_", torch.__version__))
    os.makedirs(build_dir, exist_ok=True)
    return load_extension(
        name="tunecomp_cuda_emulator",
        sources=[os.path.join(HERE, "emulator.cpp")],
        extra_include_paths=[HERE, CSRC],
        # C++20 for std::barrier (torch 2.11 passes -std=c++17 first; the last -std wins);
        # no strict aliasing for the CUDA-style type punning.
        extra_cflags=["-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread"],
        extra_ldflags=["-pthread"],
        build_directory=build_dir,
        verbose=False,
    )
