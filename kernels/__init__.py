"""Triton backend of tunecomp's ops (installed as ``tunecomp.kernels``).

The contract is the one ``tunecomp.ops`` dispatches to: ``forward``, ``backward``,
``blended_forward``, ``blended_backward`` on a 2-D ``x [N, in]`` with ``N >= 1``, returning
fresh tensors in x's dtype, plus ``unavailable_reason(device, dtype)`` and ``max_rank(dtype)``. ``TritonBackend``
bundles them as a backend object.

The kernel modules are imported lazily, on first use: Triton decides between compiling and
interpreting (``TRITON_INTERPRET=1``) when a kernel is decorated, so importing this package
early (for ``unavailable_reason``) must not freeze that choice. ``unavailable_reason`` reads
the environment at call time and refuses when the already-imported kernels were built for the
other mode.

Inputs may be non-contiguous: kernels read every tensor through its strides, nothing is copied.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Optional

import torch

__all__ = [
    "TritonBackend",
    "unavailable_reason",
    "forward",
    "backward",
    "blended_forward",
    "blended_backward",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value, in the spellings
    Triton's own ``getenv_bool`` accepts (Triton 3.6-3.8). Read here rather than through
    ``triton.knobs``: that calls into Triton's C++ module, which torch.compile cannot trace
    (``ops`` asks on every call)."""
    return os.environ.get(name, "0").lower() in ("1", "true", "on", "yes", "y")


def _interpreting() -> bool:
    """Whether Triton builds kernels for its interpreter (TRITON_INTERPRET, read as Triton
    reads it: "yes" counts)."""
    return _env_flag("TRITON_INTERPRET")


# Host-side integer helpers for grids, autotune keys and splits. triton.cdiv and
# triton.next_power_of_2 are constexpr-function wrappers that cost 2-4 us a call from Python
# (Triton 3.6-3.8, a 2-core CPU), against ~0.03 us for the arithmetic; a training step of the
# Triton backend made ~30 such calls per layer.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length()


def unavailable_reason(device, dtype: torch.dtype) -> Optional[str]:
    """None if these kernels can run on tensors of ``device`` and ``dtype``, else why not."""
    device = torch.device(device)
    if dtype not in _DTYPES:
        return f"the Triton kernels support {_DTYPES}, not {dtype}"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    interpret = _interpreting()
    built = sys.modules.get(__name__ + ".masked_lowrank")
    if built is not None and built.BUILT_FOR_INTERPRETER != interpret:
        return ("the Triton kernels were imported with TRITON_INTERPRET="
                f"{'1' if built.BUILT_FOR_INTERPRETER else '0'} but it is now "
                f"{'1' if interpret else '0'}; set it before the first call")
    if interpret and dtype == torch.bfloat16 and device.type in ("cuda", "cpu"):
        # CUDA tensors too: the interpreter copies them to the host and runs the same numpy dot
        return "tl.dot on bfloat16 is wrong under Triton's CPU interpreter (TRITON_INTERPRET is set)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    if device.type == "cpu":
        if not interpret:
            return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1"
        return None
    return f"the Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), not {device.type}"


# The forward kernels keep T = x·V, [BLOCK_M, P] with P = masked_lowrank.rank_pad(rank) (at
# most the next power of two), on chip. Their smallest config (single stage, always an
# autotune candidate) needs 48·P elements of shared memory: 196,608 bytes at P 1024 in fp32
# or 2048 in bf16, compiled for sm_90 (benchmarks/kernel_resources.py).
# With P·(bytes per element) <= 2048 that is 98,304 bytes, which fits the opt-in shared
# memory of every GPU from sm_80 on (sm_86/sm_89: 99 KiB; A100: 163 KiB; H100: 227 KiB). One
# limit for all devices keeps the choice a pure function of the dtype, also under
# torch.compile's tracing; larger ranks go to the CUDA C++ backend, which has no such limit.
MAX_RANK_BYTES = 2048
_ELEMENT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
SMALLEST_OPT_IN_SHARED = 101376  # bytes per block on sm_86 and sm_89


def max_rank(dtype: torch.dtype) -> int:
    """The largest rank the forward kernels take in ``dtype``: 512 in fp32, 1024 in fp16/bf16."""
    return MAX_RANK_BYTES // _ELEMENT_BYTES.get(dtype, 4)


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def _on_device_of(x):
    """Triton launches on the current CUDA device: make it x's (a no-op context on the CPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def forward(x, u, v, bias, mask_u, mask_v):
    """``(x @ Vm) @ Um.T + bias`` with T = x @ Vm kept on chip."""
    with _on_device_of(x):
        return _module("masked_lowrank").forward(x, u, v, bias, mask_u, mask_v)


def backward(grad_y, x, u, v, mask_u, mask_v, has_bias):
    """``(grad_x, grad_u, grad_v, grad_b)``; grad_b is empty when ``has_bias`` is False."""
    with _on_device_of(x):
        return _module("masked_lowrank").backward(grad_y, x, u, v, mask_u, mask_v, has_bias)


def blended_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha):
    """``a*(x @ W0.T + b0) + sqrt(1-a^2)*((x @ Vm) @ Um.T + bias)``, alpha a device tensor."""
    with _on_device_of(x):
        return _module("blended_lowrank").blended_forward(
            x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha
        )


def blended_backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias):
    """Gradients for x, u, v, bias of the blend; teacher and alpha get none."""
    with _on_device_of(x):
        return _module("blended_lowrank").blended_backward(
            grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias
        )


def autotuned() -> list:
    """``(name, autotuned kernel, its GPU configs)`` of every Triton kernel (imports them)."""
    masked, blended = _module("masked_lowrank"), _module("blended_lowrank")
    return [("forward", masked._forward_kernel, masked.FORWARD_GPU_CONFIGS),
            ("rank projection", masked._rank_project_kernel, masked.PROJECT_GPU_CONFIGS),
            ("grad x", masked._grad_x_kernel, masked.GRAD_X_GPU_CONFIGS),
            ("grad factor", masked._grad_factor_kernel, masked.GRAD_FACTOR_GPU_CONFIGS),
            ("blended forward", blended._blended_forward_kernel, blended.BLENDED_FORWARD_GPU_CONFIGS),
            ("fold", blended._fold_kernel, blended.FOLD_GPU_CONFIGS)]


class TritonBackend:
    """The backend object ``tunecomp.ops`` registers under the name "triton"."""

    name = "triton"
    unavailable_reason = staticmethod(unavailable_reason)
    max_rank = staticmethod(max_rank)
    forward = staticmethod(forward)
    backward = staticmethod(backward)
    blended_forward = staticmethod(blended_forward)
    blended_backward = staticmethod(blended_backward)
