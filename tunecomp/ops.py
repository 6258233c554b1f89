"""The single dispatch point of tunecomp: input checks, backend choice, custom ops, autograd.

Two public ops (DESIGN.md section 3)::

    y = masked_lowrank_linear(x, u, v, bias=None, mask_u=None, mask_v=None, backend="auto")
    y = blended_lowrank_linear(x, u, v, bias, mask_u, mask_v,
                               teacher_weight, teacher_bias, alpha, backend="auto")

Each is a ``torch.library`` custom op (``tunecomp::...``) with a fake implementation and an
autograd formula whose backward is itself a custom op, so ``torch.compile(fullgraph=True)``
traces through them and every backend only has to supply plain forward/backward functions.
The custom ops are what the compiler sees (under ``torch.compile`` and ``torch.export``).
Called eagerly, the same forward and backward run under a plain ``torch.autograd.Function``
when autograd has something to record, and directly when it has not (inference): the custom
op's dispatch and autograd wrapper cost about as much host time as the rest of a small call.

The Python wrappers below do the work that must not be repeated by every backend:
argument checks (a clear ``TypeError``/``ValueError`` naming the argument, the expected and
the actual), autocast, flattening the leading dims of ``x`` to one token dim, turning
``alpha`` into a one-element float32 tensor (so a changing alpha neither recompiles a
compiled model nor invalidates a CUDA graph), and resolving ``backend="auto"``.

Gradients flow to ``x``, ``u``, ``v`` and ``bias``. Masks, the teacher weight and bias and
alpha are constants: they never receive a gradient. Double backward is not supported.

For inference on the CPU from the kept entries alone (``tunecomp.deploy``'s sparse form)
there is also ``packed_lowrank_linear(x, pack_kept(u, v), bias)``: a custom op with a fake
implementation but no autograd formula (it refuses inputs that need a gradient).
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
import weakref
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import reference

try:  # the native extension; tunecomp still works (backend "torch") without it
    from . import _C
    NATIVE_IMPORT_ERROR = None
except ImportError as error:  # e.g. the sources were copied without `pip install`
    _C = None
    NATIVE_IMPORT_ERROR = str(error)

__all__ = [
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "masked_lowrank_linear",
    "blended_lowrank_linear",
]

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")
"""Every backend name the ops accept. ``available_backends()`` says which run here."""

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Backends. Each one works on a 2-D x [N, in] with N >= 1 and returns fresh tensors.
# --------------------------------------------------------------------------------------------


# The "torch" backend's masking: ``reference.apply_mask``'s result, bit for bit, as an integer
# multiply of the factor's bits by the mask (kept: bits * 1; pruned: 0, which is +0.0, as
# where gives; a NaN stored in a pruned entry goes too). ATen's CPU ``torch.where`` is a scalar
# loop with a branch per element: on 2 cores, a [768, 192] float32 factor at half kept took
# 360-490 us against 60 us this way. It records nothing for autograd, so where autograd
# would record, the reference's where runs; inside the ops' forward and backward it never does.
_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def apply_mask(weight: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``weight`` with pruned entries (``mask == False``) set to exactly zero."""
    if mask is None or (weight.requires_grad and torch.is_grad_enabled()):
        return reference.apply_mask(weight, mask)
    return (weight.view(_SAME_SIZE_INT[weight.element_size()]) * mask).view(weight.dtype)


# The blend with the student folded into the teacher's weight. While alpha > 0 the blend runs
# the teacher's dense GEMM anyway; with W = alpha·W0 + s·Um·Vmᵀ (s = sqrt(1 - alpha²)) it is
# that one GEMM, y = x·Wᵀ + (alpha·b0 + s·b), instead of the dense GEMM, the student's two
# rank-r GEMMs and two scaled adds over y. Folding costs r·in·out multiply-adds whatever the
# token count n, and saves the student's n·r·(in + out): it pays from n·(in + out) > in·out
# (more than 384 tokens at 768→768: from two ViT-B/16 images; folding_pays). In the
# backward, grad_x = dy·W replaces dy·W0 + G·Vmᵀ: it saves n·r·in for r·in·out, so from n > out
# (folding_pays_backward); the factor gradients need T and G as before. Same math, rounded
# differently: W once to x's dtype, as any dense layer's weight, where the two-branch form
# rounds T and each branch's output. Every backend follows this rule: "torch" and (where its
# student runs dense) "cpu" below, "triton" (kernels/blended_lowrank.py) and "cuda"
# (csrc/lowrank_cuda_ops.h) with a fold kernel of their own.


def folding_pays(n: int, in_features: int, out_features: int) -> bool:
    """Whether the blend's forward over ``n`` tokens runs folded (fewer multiply-adds)."""
    return n * (in_features + out_features) > in_features * out_features


def folding_pays_backward(n: int, out_features: int) -> bool:
    """Whether the blend's backward computes grad_x through the folded weight."""
    return n > out_features


def _folded_weight(u_m: Tensor, v_m: Tensor, teacher_weight: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """``a·W0 + s·u_m·v_mᵀ`` [out, in], in one GEMM with the teacher term as its addend."""
    return torch.addmm(teacher_weight * a, u_m * s, v_m.T)


def _folded_bias(bias: Optional[Tensor], teacher_bias: Optional[Tensor], a: Tensor,
                 s: Tensor) -> Optional[Tensor]:
    if bias is None and teacher_bias is None:
        return None
    if bias is None:
        return teacher_bias * a
    if teacher_bias is None:
        return bias * s
    return teacher_bias * a + bias * s


class _TorchBackend:
    """Eager PyTorch: the reference math, any device, any floating dtype; the blend folded
    where that is fewer multiply-adds (``folding_pays``)."""

    name = "torch"

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    @staticmethod
    def forward(x, u, v, bias, mask_u, mask_v):
        return _TorchBackend.forward_with_t(x, u, v, bias, mask_u, mask_v)[0]

    @staticmethod
    def forward_with_t(x, u, v, bias, mask_u, mask_v):
        # reference.masked_lowrank_linear's math, the bias added in the GEMM's epilogue (one
        # pass over y fewer, as nn.Linear does) rather than by a kernel of its own
        t = x @ apply_mask(v, mask_v)
        return torch.nn.functional.linear(t, apply_mask(u, mask_u), bias), t

    @staticmethod
    def backward(grad_y, x, u, v, mask_u, mask_v, has_bias, t=None):
        u_m, v_m = apply_mask(u, mask_u), apply_mask(v, mask_v)
        if t is None:  # not kept by the forward ("Saved T" below)
            t = x @ v_m
        g = grad_y @ u_m
        grad_x = g @ v_m.T
        grad_u = apply_mask(grad_y.T @ t, mask_u)
        grad_v = apply_mask(x.T @ g, mask_v)
        grad_b = grad_y.sum(0) if has_bias else grad_y.new_empty(0)
        return grad_x, grad_u, grad_v, grad_b

    @staticmethod
    def blended_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha):
        return _TorchBackend.blended_forward_with_t(x, u, v, bias, mask_u, mask_v, teacher_weight,
                                                    teacher_bias, alpha)[0]

    @staticmethod
    def blended_forward_with_t(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha):
        a, s = reference.blend_scales(alpha, x.dtype)
        if not folding_pays(*x.shape, u.shape[0]):  # two branches, biases in their GEMMs
            teacher = torch.nn.functional.linear(x, teacher_weight, teacher_bias)
            student, t = _TorchBackend.forward_with_t(x, u, v, bias, mask_u, mask_v)
            return torch.addcmul(teacher * a, student, s), t
        weight = _folded_weight(apply_mask(u, mask_u), apply_mask(v, mask_v), teacher_weight, a, s)
        return torch.nn.functional.linear(x, weight, _folded_bias(bias, teacher_bias, a, s)), None

    @staticmethod
    def blended_backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias, t=None):
        a, s = reference.blend_scales(alpha, x.dtype)
        u_m, v_m = apply_mask(u, mask_u), apply_mask(v, mask_v)
        if t is None:
            t = x @ v_m
        g = (grad_y @ u_m) * s
        if folding_pays_backward(x.shape[0], u.shape[0]):
            grad_x = grad_y @ _folded_weight(u_m, v_m, teacher_weight, a, s)
        else:
            grad_x = g @ v_m.T + a * (grad_y @ teacher_weight)
        grad_u = apply_mask((grad_y.T @ t) * s, mask_u)
        grad_v = apply_mask(x.T @ g, mask_v)
        grad_b = grad_y.sum(0) * s if has_bias else grad_y.new_empty(0)
        return grad_x, grad_u, grad_v, grad_b


# torch.optim steps taken in this process. A fused optimizer (`fused=True`) writes the
# parameters without bumping their version counters, so the cpu backend's packing cache also
# reads the kept values again once this has moved.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _forget(cache_ref, key, _dead_ref) -> None:
    """Weakref callback: drop ``key`` from the cache (if both still exist)."""
    cache = cache_ref()
    if cache is not None:
        cache.pop(key, None)


class _CpuBackend:
    """The C++ kernels of ``tunecomp._C`` on CPU tensors, float32.

    Dense factors run as BLAS GEMMs; once few entries are kept, a path that skips the pruned
    ones (see csrc/lowrank_cpu.cpp). The blend adds the teacher's GEMM in eager PyTorch, or,
    where the student runs dense and enough tokens come, folds the student into it
    (``folding_pays``). All-one masks (before the first pruning, or at rho 0) are not applied:
    selecting by them only copied the factors (at 197 tokens, rank 192, the forward ran
    1.07-1.15x and the backward 1.12-1.17x faster without; at 1576 tokens, within noise).
    """

    name = "cpu"
    # Kept fraction of factor entries under which skipping pruned entries beats BLAS, in the
    # forward and the backward alike. Measured on 2 cores (ViT-B fc1, 1576 tokens, rank 192):
    # the sparse forward is 1.4x slower at 50% kept, 1.7x faster at 10% kept; the crossover
    # lies near 30%. A training step's work once the forward runs sparse (packing, forward,
    # backward), measured paired (2026-11-27, 4 ViT-B shapes, 197 and 1576 tokens, rank 192),
    # backward sparse against dense: 1.15-2.04x faster at 12% kept, 0.91-1.53x at 20%,
    # 0.89-1.19x at 24% (geometric means 1.47, 1.19, 1.04; slower only at 197 tokens).
    SPARSE_BELOW = 0.25

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if _C is None:
            return f"tunecomp._C is not built ({NATIVE_IMPORT_ERROR})"
        if device.type != "cpu":
            return "the C++ kernels take CPU tensors"
        if dtype != torch.float32:
            return f"the C++ CPU kernels take float32, not {dtype}"
        return None

    def __init__(self):
        # [refs, states, optimizer steps, kept fraction, packed groups] per factor set, reused
        # while none of u, v and the masks is replaced or modified in place, so an inference
        # model packs once and a training step packs once for forward and backward. Each
        # tensor's identity, version counter, data pointer, storage and layout are checked
        # (_states): an in-place change bumps the version, while Module.to()/.half() and
        # `.data =` swap the storage, or only the view of it, under the same tensor and
        # version. Where only u or v changed (every training step between two prunings), the
        # same entries are kept: their values alone are read again (pack_values_cpu, a gather
        # of the kept entries instead of two passes over the whole factors). Some writes bump
        # no version: fused optimizers (`fused=True`) and in-place ops on `.data`. So the
        # values are also read again after any torch.optim step (_optimizer_steps); an edit
        # through `.data` is not seen (edit the tensor itself, as prune.py does with the
        # masks, or call clear_cache()).
        self._packed = collections.OrderedDict()

    @staticmethod
    def _states(tensors) -> list:
        """(version, data pointer, storage, shape, strides, storage offset) of each tensor. The
        storage is held by a weak reference, which frees its data but keeps its address from
        being reused while the cache holds it: a data pointer alone can be (after
        `.half().float()`, the new data lay at the old address in 1% of tries). The layout,
        because `t.data = t.data.T` (a square factor) or a slice of it keeps the storage."""
        return [(t._version, t.data_ptr(), StorageWeakRef(t.untyped_storage()), tuple(t.shape),
                 t.stride(), t.storage_offset()) for t in tensors]

    @staticmethod
    def _kept(u, v, mask_u, mask_v) -> float:
        """The fraction of factor entries kept (a mask left out keeps all of its factor's)."""
        kept = sum(t.numel() if m is None else int(m.sum()) for t, m in ((u, mask_u), (v, mask_v)))
        total = u.numel() + v.numel()
        return kept / total if total else 1.0  # no features: nothing to prune

    def _pack(self, u, v, mask_u, mask_v) -> tuple:
        """(kept fraction, packed groups or None) of the factors under their masks (a mask
        left out keeps every entry)."""
        tensors = (u, v, mask_u, mask_v)
        if mask_u is None or mask_v is None or any(t.is_inference() for t in tensors):
            # not cached: None has no weak reference, an inference tensor no version (the
            # sparse kernels then find the kept entries themselves)
            return self._kept(u, v, mask_u, mask_v), None
        key = tuple(id(t) for t in tensors)
        states = self._states(tensors)
        entry = self._packed.get(key)
        if entry is not None and all(r() is t for r, t in zip(entry[0], tensors)):
            refs, old_states, steps, kept, packed = entry
            if old_states[2:] == states[2:]:  # the masks did not change: nor did the kept entries
                if packed is not None and (old_states[:2] != states[:2] or steps != _optimizer_steps):
                    packed = _C.pack_values_cpu(u.detach(), v.detach(), packed)
                # put back last (not move_to_end: another thread may have dropped the key)
                self._packed.pop(key, None)
                self._packed[key] = [refs, states, _optimizer_steps, kept, packed]
                return kept, packed
        kept = self._kept(u, v, mask_u, mask_v)
        packed = None
        if kept < self.SPARSE_BELOW:  # the backward's groupings too: it runs sparse as well
            packed = _C.pack_groups_cpu(u.detach(), v.detach(), mask_u, mask_v, backward=True)
        # an entry goes when any of its tensors does: a deleted model's packing is not kept
        drop = functools.partial(_forget, weakref.ref(self._packed), key)
        self._packed[key] = [[weakref.ref(t, drop) for t in tensors], states, _optimizer_steps, kept, packed]
        while len(self._packed) > 256:  # one entry per layer in use is enough
            self._packed.popitem(last=False)
        return kept, packed

    def _forward(self, x, u, v, bias, mask_u, mask_v, with_t):
        """(y, T or None). Without with_t the sparse path stores no T (the dense one makes it
        on the way anyway)."""
        kept, packed = self._pack(u, v, mask_u, mask_v)
        if kept == 1.0:
            mask_u = mask_v = None  # nothing pruned (yet): selecting by the masks is a copy
        sparse = kept < self.SPARSE_BELOW
        if with_t:
            return tuple(_C.lowrank_forward_with_t_cpu(x, u, v, bias, mask_u, mask_v, sparse, packed))
        return _C.lowrank_forward_cpu(x, u, v, bias, mask_u, mask_v, sparse, packed), None

    def forward(self, x, u, v, bias, mask_u, mask_v):
        return self._forward(x, u, v, bias, mask_u, mask_v, with_t=False)[0]

    def forward_with_t(self, x, u, v, bias, mask_u, mask_v):
        return self._forward(x, u, v, bias, mask_u, mask_v, with_t=True)

    def backward(self, grad_y, x, u, v, mask_u, mask_v, has_bias, t=None):
        kept, packed = self._pack(u, v, mask_u, mask_v)
        if kept == 1.0:
            mask_u = mask_v = None
        return tuple(_C.lowrank_backward_cpu(grad_y.contiguous(), x, u, v, mask_u, mask_v, has_bias,
                                             kept < self.SPARSE_BELOW, packed, t))

    def _blended_forward(self, x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha,
                         with_t):
        kept, _ = self._pack(u, v, mask_u, mask_v)
        if kept >= self.SPARSE_BELOW and folding_pays(*x.shape, u.shape[0]):
            # the student would run as BLAS GEMMs: fold it into the teacher's (see folding_pays)
            return _TorchBackend.blended_forward_with_t(x, u, v, bias, mask_u, mask_v,
                                                        teacher_weight, teacher_bias, alpha)
        a, s = reference.blend_scales(alpha, x.dtype)
        teacher = torch.nn.functional.linear(x, teacher_weight, teacher_bias)
        student, t = self._forward(x, u, v, bias, mask_u, mask_v, with_t)
        return a * teacher + s * student, t

    def blended_forward(self, x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha):
        return self._blended_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias,
                                     alpha, with_t=False)[0]

    def blended_forward_with_t(self, x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias,
                               alpha):
        return self._blended_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias,
                                     alpha, with_t=True)

    def blended_backward(self, grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias,
                         t=None):
        kept, _ = self._pack(u, v, mask_u, mask_v)
        if kept >= self.SPARSE_BELOW and folding_pays_backward(x.shape[0], u.shape[0]):
            return _TorchBackend.blended_backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight,
                                                  alpha, has_bias, t)
        a, s = reference.blend_scales(alpha, x.dtype)
        grad_x, grad_u, grad_v, grad_b = self.backward(grad_y * s, x, u, v, mask_u, mask_v, has_bias, t)
        return grad_x + a * (grad_y @ teacher_weight), grad_u, grad_v, grad_b


class _CudaBackend:
    """The CUDA C++ kernels of ``tunecomp._C`` (csrc/lowrank_cuda.cu) on CUDA tensors.

    float32, float16 and bfloat16; fp16/bf16 multiply on tensor cores with fp32 accumulation,
    float32 in IEEE fp32 whatever ``torch.get_float32_matmul_precision()`` says (except the
    folded blend's dense GEMM, cuBLAS through ATen: see ``folding_pays``). Inputs are read
    through their strides (nothing is copied); alpha is read on the device.

    ``native`` and ``device_type`` exist for tests/cuda_emulator, which runs the same C++
    on the CPU.
    """

    name = "cuda"
    _DTYPES = (torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, native=None, device_type: str = "cuda"):
        self.native = _C if native is None else native
        self._device_type = device_type

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        native = self.native
        if native is None:
            return f"tunecomp._C is not built ({NATIVE_IMPORT_ERROR})"
        if not hasattr(native, "lowrank_forward_cuda"):
            return ("tunecomp._C was built without its CUDA part (a CPU-only torch, no nvcc, "
                    "or TUNECOMP_NO_CUDA=1 at build time)")
        if device.type != self._device_type:
            return f"the CUDA kernels take {self._device_type} tensors, not {device.type}"
        if dtype not in self._DTYPES:
            return f"the CUDA kernels support {self._DTYPES}, not {dtype}"
        if self._device_type != "cuda":
            return None
        if not torch.cuda.is_available():
            return "CUDA is not available"
        major, minor = torch.cuda.get_device_capability(device)
        archs = native.cuda_compiled_archs()  # __CUDA_ARCH__ style: 800, 900
        if not any(a // 100 == major and (a % 100) // 10 <= minor for a in archs):
            return (f"this build has device code for {['sm_%d' % (a // 10) for a in archs]}, "
                    f"not sm_{major}{minor}: rebuild with TUNECOMP_CUDA_ARCHS={major}{minor}")
        return None

    def forward(self, x, u, v, bias, mask_u, mask_v):
        return self.native.lowrank_forward_cuda(x, u, v, bias, mask_u, mask_v)

    def backward(self, grad_y, x, u, v, mask_u, mask_v, has_bias):
        return tuple(self.native.lowrank_backward_cuda(grad_y, x, u, v, mask_u, mask_v, has_bias))

    def blended_forward(self, x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha):
        return self.native.blended_forward_cuda(x, u, v, bias, mask_u, mask_v, teacher_weight,
                                                teacher_bias, alpha,
                                                folding_pays(*x.shape, u.shape[0]))

    def blended_backward(self, grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias):
        return tuple(self.native.blended_backward_cuda(
            grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias,
            folding_pays_backward(x.shape[0], u.shape[0])))


class _PendingBackend:
    """A backend name that the contract reserves but that cannot be loaded here (the reason)."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self._reason = reason

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return self._reason


def _triton_backend():
    try:
        from .kernels import TritonBackend
    except ImportError as error:  # kernels/ not installed with the package
        return _PendingBackend("triton", f"tunecomp.kernels cannot be imported ({error})")
    return TritonBackend()


_BACKENDS = {
    "torch": _TorchBackend(),
    "triton": _triton_backend(),
    "cuda": _CudaBackend(),
    "cpu": _CpuBackend(),
}


def clear_cache() -> None:
    """Forget the cpu backend's packings of kept entries: needed only after factors or masks
    were edited through ``.data`` (which no version counter sees), and before
    ``torch.utils.swap_tensors`` on tensors the cpu backend has run (what ``Module.to()`` and
    ``load_state_dict`` use under ``torch.__future__.set_swap_module_params_on_conversion``):
    it refuses tensors with weak references, and the cache holds one to each."""
    _BACKENDS["cpu"]._packed.clear()


# Preference order of "auto", per device type; the first available backend wins. On CUDA
# tensors that is eager PyTorch (cuBLAS): on an H200 in bf16 it was faster than the triton and
# the cuda backend at every measured point, forward and backward, masked and blended
# (benchmarks/results/nvidia-h200-2026-11-26.md: geometric means 0.20x and 0.11x of eager for
# the masked forward). The kernel backends stay selectable by name.
_AUTO_ORDER = {"cuda": ("torch",), "cpu": ("cpu", "torch")}


def available_backends(
    device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32
) -> dict:
    """``{name: None if usable else the reason it is not}`` for tensors on ``device``."""
    device = torch.device(device)
    return {name: b.unavailable_reason(device, dtype) for name, b in _BACKENDS.items()}


def _rank_refusal(name: str, dtype: torch.dtype, rank: Optional[int]) -> Optional[str]:
    """Why backend ``name`` cannot take ``rank`` (backends with a ``max_rank``), else None."""
    limit = getattr(_BACKENDS[name], "max_rank", None)
    if rank is None or limit is None or rank <= limit(dtype):
        return None
    return f"it takes rank <= {limit(dtype)} in {dtype}, got rank {rank}"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, rank: Optional[int] = None) -> str:
    """The concrete backend that runs for ``backend`` on tensors of ``device`` and ``dtype``
    (and factors of ``rank``, where given: the Triton forward has a largest rank).

    A backend named explicitly is used or refused with a ``ValueError``, never swapped.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}; got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if _BACKENDS[name].unavailable_reason(device, dtype) is None and _rank_refusal(name, dtype, rank) is None:
                return name
        return "torch"
    reason = _BACKENDS[backend].unavailable_reason(device, dtype) or _rank_refusal(backend, dtype, rank)
    if reason is not None:
        raise ValueError(
            f"backend={backend!r} is not available for {dtype} tensors on {device}: {reason}. "
            f"Use backend='auto' or one of "
            f"{[n for n, r in available_backends(device, dtype).items() if r is None and _rank_refusal(n, dtype, rank) is None]}"
        )
    return backend


# --------------------------------------------------------------------------------------------
# The ops' bodies, and two ways autograd reaches them. x is 2-D here; the public wrappers
# flatten leading dims and check everything first.
#
# Under torch.compile (and torch.export) the calls go through torch.library custom ops, which
# the compiler treats as opaque nodes with fake-tensor shapes. In eager mode the same bodies
# run under a plain torch.autograd.Function: the custom op's autograd wrapper costs ~70-100 us of
# host time per forward+backward (measured on the CPU; torch re-fills the schema defaults on
# every call), more than the whole eager math at small token counts. With nothing for
# autograd to record, the backend runs directly.
# --------------------------------------------------------------------------------------------


def _lowrank_grads_for_no_tokens(x, u, v, has_bias):
    # N == 0: the gradient of a sum over no tokens is zero, not empty.
    grad_b = u.new_zeros(u.shape[0]) if has_bias else u.new_empty(0)
    return x.new_empty(x.shape), torch.zeros_like(u), torch.zeros_like(v), grad_b


def _masked_forward(x, u, v, bias, mask_u, mask_v, backend):
    if x.shape[0] == 0:
        return x.new_empty((0, u.shape[0]))
    return _BACKENDS[backend].forward(x, u, v, bias, mask_u, mask_v)


# Saved T. The factor gradients need T = x·Vm [N, r]. A backend whose forward makes T on the
# way ("torch"; "cpu", whose sparse path then also writes it out; the blend where it does not
# fold) offers ``forward_with_t`` / ``blended_forward_with_t``, and the eager route saves that
# T for the backward, which then skips one of its GEMMs: the forward and backward of the
# masked op are 6 GEMMs instead of 7 (on 2 CPU cores, float32, rank 192: 1.02-1.30x faster,
# from 0.80-0.96x of eager autograd, which saves T too, to 0.95-1.11x; the cpu sparse path,
# at 5-20% kept: geometric mean 1.09x, up to 1.46x where in_features is large). It costs the
# memory eager autograd spends: N·r per layer while the graph lives. The fused GPU kernels never hold T in memory
# and recompute it; so does the custom-op route (torch.compile), whose forward returns y alone.
# Only a backend with ``forward_with_t`` ever gets a T in its backward.


def _masked_forward_with_t(x, u, v, bias, mask_u, mask_v, backend):
    impl = _BACKENDS[backend]
    if x.shape[0] == 0 or not hasattr(impl, "forward_with_t"):
        return _masked_forward(x, u, v, bias, mask_u, mask_v, backend), None
    return impl.forward_with_t(x, u, v, bias, mask_u, mask_v)


def _masked_backward(grad_y, x, u, v, mask_u, mask_v, has_bias, backend, t=None):
    if x.shape[0] == 0:
        return _lowrank_grads_for_no_tokens(x, u, v, has_bias)
    args = (grad_y, x, u, v, mask_u, mask_v, has_bias)
    impl = _BACKENDS[backend]
    return impl.backward(*args) if t is None else impl.backward(*args, t)


def _blended_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha, backend):
    if x.shape[0] == 0:
        return x.new_empty((0, u.shape[0]))
    return _BACKENDS[backend].blended_forward(
        x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha
    )


def _blended_forward_with_t(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha,
                            backend):
    impl = _BACKENDS[backend]
    if x.shape[0] == 0 or not hasattr(impl, "blended_forward_with_t"):
        return _blended_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha,
                                backend), None
    return impl.blended_forward_with_t(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias,
                                       alpha)


def _blended_backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias, backend,
                      t=None):
    if x.shape[0] == 0:
        return _lowrank_grads_for_no_tokens(x, u, v, has_bias)
    args = (grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias)
    impl = _BACKENDS[backend]
    return impl.blended_backward(*args) if t is None else impl.blended_backward(*args, t)


# Autograd glue shared by both routes. Inputs are the op's arguments in schema order; the
# trailing Nones are the masks, teacher, alpha and backend, which get no gradient.


def _masked_save(ctx, inputs, t=None):
    x, u, v, bias, mask_u, mask_v, backend = inputs
    ctx.save_for_backward(x, u, v, mask_u, mask_v, t)
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _masked_grads(ctx, grad_y, backward):
    x, u, v, mask_u, mask_v, t = ctx.saved_tensors
    grad_x, grad_u, grad_v, grad_b = backward(grad_y, x, u, v, mask_u, mask_v, ctx.has_bias, ctx.backend,
                                              t)
    return grad_x, grad_u, grad_v, (grad_b if ctx.has_bias else None), None, None, None


def _blended_save(ctx, inputs, t=None):
    x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha, backend = inputs
    ctx.save_for_backward(x, u, v, mask_u, mask_v, teacher_weight, alpha, t)
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _blended_grads(ctx, grad_y, backward):
    x, u, v, mask_u, mask_v, teacher_weight, alpha, t = ctx.saved_tensors
    grad_x, grad_u, grad_v, grad_b = backward(
        grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, ctx.has_bias, ctx.backend, t
    )
    grad_b = grad_b if ctx.has_bias else None
    return grad_x, grad_u, grad_v, grad_b, None, None, None, None, None, None


# The custom ops (the route under torch.compile).


@torch.library.custom_op("tunecomp::masked_lowrank_linear", mutates_args=())
def _masked_lowrank_linear_op(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    mask_u: Optional[Tensor],
    mask_v: Optional[Tensor],
    backend: str,
) -> Tensor:
    return _masked_forward(x, u, v, bias, mask_u, mask_v, backend)


@_masked_lowrank_linear_op.register_fake
def _(x, u, v, bias, mask_u, mask_v, backend):
    return x.new_empty((x.shape[0], u.shape[0]))


@torch.library.custom_op("tunecomp::masked_lowrank_linear_backward", mutates_args=())
def _masked_lowrank_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    u: Tensor,
    v: Tensor,
    mask_u: Optional[Tensor],
    mask_v: Optional[Tensor],
    has_bias: bool,
    backend: str,
    t: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _masked_backward(grad_y, x, u, v, mask_u, mask_v, has_bias, backend, t)


@_masked_lowrank_linear_backward_op.register_fake
def _(grad_y, x, u, v, mask_u, mask_v, has_bias, backend, t=None):
    grad_b = u.new_empty(u.shape[0] if has_bias else 0)
    # contiguous, as every backend returns them (empty_like would copy a view's strides)
    return x.new_empty(x.shape), u.new_empty(u.shape), v.new_empty(v.shape), grad_b


_masked_lowrank_linear_op.register_autograd(
    lambda ctx, grad_y: _masked_grads(ctx, grad_y, _masked_lowrank_linear_backward_op),
    setup_context=lambda ctx, inputs, output: _masked_save(ctx, inputs),
)


@torch.library.custom_op("tunecomp::blended_lowrank_linear", mutates_args=())
def _blended_lowrank_linear_op(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    mask_u: Optional[Tensor],
    mask_v: Optional[Tensor],
    teacher_weight: Tensor,
    teacher_bias: Optional[Tensor],
    alpha: Tensor,
    backend: str,
) -> Tensor:
    return _blended_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha, backend)


@_blended_lowrank_linear_op.register_fake
def _(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha, backend):
    return x.new_empty((x.shape[0], u.shape[0]))


@torch.library.custom_op("tunecomp::blended_lowrank_linear_backward", mutates_args=())
def _blended_lowrank_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    u: Tensor,
    v: Tensor,
    mask_u: Optional[Tensor],
    mask_v: Optional[Tensor],
    teacher_weight: Tensor,
    alpha: Tensor,
    has_bias: bool,
    backend: str,
    t: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _blended_backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias, backend, t)


@_blended_lowrank_linear_backward_op.register_fake
def _(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias, backend, t=None):
    grad_b = u.new_empty(u.shape[0] if has_bias else 0)
    # contiguous, as every backend returns them (empty_like would copy a view's strides)
    return x.new_empty(x.shape), u.new_empty(u.shape), v.new_empty(v.shape), grad_b


_blended_lowrank_linear_op.register_autograd(
    lambda ctx, grad_y: _blended_grads(ctx, grad_y, _blended_lowrank_linear_backward_op),
    setup_context=lambda ctx, inputs, output: _blended_save(ctx, inputs),
)


# The eager route. The backward is once_differentiable: no backend's backward is itself
# differentiable (the custom op route refuses a double backward too).


class _MaskedLowRankFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        y, t = _masked_forward_with_t(*inputs)
        _masked_save(ctx, inputs, t)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):  # compiled autograd traces it: the opaque op then
        return _masked_grads(ctx, grad_y, _masked_lowrank_linear_backward_op
                             if torch.compiler.is_compiling() else _masked_backward)


class _BlendedLowRankFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        y, t = _blended_forward_with_t(*inputs)
        _blended_save(ctx, inputs, t)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        return _blended_grads(ctx, grad_y, _blended_lowrank_linear_backward_op
                              if torch.compiler.is_compiling() else _blended_backward)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {expected}; got {type(t).__name__}")


def _check_same(name: str, t: Tensor, x: Tensor) -> None:
    """``t`` shares x's device and (for floating tensors) dtype."""
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}; got {t.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have x's dtype {x.dtype}; got {t.dtype}")


def _check_lowrank_args(x, u, v, bias, mask_u, mask_v) -> None:
    for name, t in (("x", x), ("u", u), ("v", v)):
        _check_tensor(name, t)
    for name, t in (("bias", bias), ("mask_u", mask_u), ("mask_v", mask_v)):
        _check_tensor(name, t, optional=True)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must have a floating dtype, one of {_FLOAT_DTYPES}; got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., in_features]; got {_describe(x)}")
    for name, t in (("u", u), ("v", v)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [{'out' if name == 'u' else 'in'}, rank]; "
                             f"got {_describe(t)}")
        _check_same(name, t, x)
    if x.shape[-1] != v.shape[0]:
        raise ValueError(
            f"x.shape[-1] (in_features) must equal v.shape[0]; got x {tuple(x.shape)} and "
            f"v {tuple(v.shape)}"
        )
    if u.shape[1] != v.shape[1]:
        raise ValueError(
            f"u and v must have the same rank (dim 1); got u {tuple(u.shape)} and "
            f"v {tuple(v.shape)}"
        )
    if u.shape[1] == 0:
        raise ValueError(f"rank must be at least 1; got u {tuple(u.shape)}")
    for name, mask, factor in (("mask_u", mask_u, u), ("mask_v", mask_v, v)):
        if mask is None:
            continue
        if mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor; got dtype {mask.dtype}")
        if mask.shape != factor.shape:
            raise ValueError(
                f"{name} must have the shape of {name[-1]} {tuple(factor.shape)}; "
                f"got {tuple(mask.shape)}"
            )
        if mask.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}; got {mask.device}")
    if bias is not None:
        if bias.shape != (u.shape[0],):
            raise ValueError(
                f"bias must have shape (out_features,) = ({u.shape[0]},); got {tuple(bias.shape)}"
            )
        _check_same("bias", bias, x)


def _check_teacher_args(x, u, teacher_weight, teacher_bias, alpha) -> None:
    _check_tensor("teacher_weight", teacher_weight)
    _check_tensor("teacher_bias", teacher_bias, optional=True)
    expected = (u.shape[0], x.shape[-1])
    if teacher_weight.shape != expected:
        raise ValueError(
            f"teacher_weight must have shape (out_features, in_features) = {expected}; "
            f"got {tuple(teacher_weight.shape)}"
        )
    _check_same("teacher_weight", teacher_weight, x)
    if teacher_bias is not None:
        if teacher_bias.shape != (u.shape[0],):
            raise ValueError(
                f"teacher_bias must have shape (out_features,) = ({u.shape[0]},); "
                f"got {tuple(teacher_bias.shape)}"
            )
        _check_same("teacher_bias", teacher_bias, x)
    if isinstance(alpha, Tensor):
        # The range of a tensor alpha is not checked here: that would sync the device on
        # every call. FusedPrunedLowRankLinear checks it when alpha is set. Outside [-1, 1]
        # every backend computes sqrt(1 - alpha²) as NaN.
        if alpha.numel() != 1:
            raise ValueError(f"alpha must be a number or a one-element tensor; got {_describe(alpha)}")
        if not alpha.is_floating_point():
            raise TypeError(f"alpha tensor must have a floating dtype; got {alpha.dtype}")
    elif isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
        if not (0.0 <= float(alpha) <= 1.0):  # also rejects NaN
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    else:
        raise TypeError(f"alpha must be a float in [0, 1] or a one-element tensor; "
                        f"got {type(alpha).__name__}")


def _autocast(x: Tensor, tensors: Sequence[Optional[Tensor]]):
    """Apply autocast by hand: custom ops are opaque to it, so under
    ``torch.autocast`` the floating inputs are cast to the autocast dtype here."""
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    if not isinstance(x, Tensor) or not torch.amp.is_autocast_available(device_type) \
            or not torch.is_autocast_enabled(device_type):  # (meta: shape inference)
        return x, tensors
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        # as torch's autocast: float64 is left as it is
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(x), [cast(t) for t in tensors]


@torch.library.custom_op("tunecomp::packed_lowrank_linear", mutates_args=())
def _packed_lowrank_linear_op(x: Tensor, packed: list[Tensor], bias: Optional[Tensor]) -> Tensor:
    return _C.lowrank_forward_packed_cpu(x, packed, bias)


@_packed_lowrank_linear_op.register_fake
def _(x, packed, bias):
    return x.new_empty((x.shape[0], packed[3].shape[0] - 1))


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def masked_lowrank_linear(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    bias: Optional[Tensor] = None,
    mask_u: Optional[Tensor] = None,
    mask_v: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """``y = (x @ (v*mask_v)) @ (u*mask_u).T + bias``.

    Args:
        x: ``[..., in]`` input, fp16/bf16/fp32 (fp64 on the "torch" backend).
        u: ``[out, r]`` and v: ``[in, r]`` factors, x's dtype and device.
        bias: ``[out]`` or None.
        mask_u, mask_v: bool masks of u's / v's shape (True = kept), or None (all kept).
            A pruned entry counts as exactly zero, whatever it holds (NaN included), and
            its gradient is exactly zero.
        backend: one of ``BACKENDS``; "auto" picks the fastest available for x's device.

    Returns ``[..., out]`` in x's dtype. Zero tokens give an empty ``[..., out]`` output.
    """
    x, (u, v, bias) = _autocast(x, (u, v, bias))
    _check_lowrank_args(x, u, v, bias, mask_u, mask_v)
    name = resolve_backend(backend, x.device, x.dtype, u.shape[1])
    lead = x.shape[:-1]
    args = (_tokens(x), u, v, bias, mask_u, mask_v, name)
    if torch.compiler.is_compiling():
        y = _masked_lowrank_linear_op(*args)
    elif _records_grad(x, u, v, bias):
        y = _MaskedLowRankFunction.apply(*args)
    else:
        y = _masked_forward(*args)
    return y if x.dim() == 2 else y.reshape(*lead, u.shape[0])


def _tokens(x: Tensor) -> Tensor:
    """x [..., in] as [tokens, in] (a 2-D x as it is: two reshapes cost ~7 us of host time a
    call, which the GPU backends' launches are bound by at small token counts)."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _records_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd would record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def blended_lowrank_linear(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    mask_u: Optional[Tensor],
    mask_v: Optional[Tensor],
    teacher_weight: Tensor,
    teacher_bias: Optional[Tensor],
    alpha: Union[float, Tensor],
    backend: str = "auto",
) -> Tensor:
    """``alpha*(x @ W0.T + b0) + sqrt(1-alpha**2) * masked_lowrank_linear(x, u, v, ...)``.

    The training-time blend of the frozen teacher ``W0 = teacher_weight [out, in]``,
    ``b0 = teacher_bias [out]`` with the low-rank student. ``alpha`` is a number in [0, 1]
    or a one-element tensor (its range is then the caller's responsibility: checking it
    here would sync the device every call). Teacher and alpha receive no gradient.
    """
    x, (u, v, bias, teacher_weight, teacher_bias) = _autocast(
        x, (u, v, bias, teacher_weight, teacher_bias)
    )
    _check_lowrank_args(x, u, v, bias, mask_u, mask_v)
    _check_teacher_args(x, u, teacher_weight, teacher_bias, alpha)
    alpha_dtype = torch.promote_types(x.dtype, torch.float32)  # float64 inputs: not rounded
    if isinstance(alpha, Tensor):
        alpha = alpha.detach().reshape(()).to(device=x.device, dtype=alpha_dtype)
    else:
        # a fill, not torch.tensor(): no host-to-device copy, so no sync and capturable
        alpha = torch.full((), float(alpha), dtype=alpha_dtype, device=x.device)
    name = resolve_backend(backend, x.device, x.dtype, u.shape[1])
    lead = x.shape[:-1]
    args = (_tokens(x), u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha, name)
    if torch.compiler.is_compiling():
        y = _blended_lowrank_linear_op(*args)
    elif _records_grad(x, u, v, bias, teacher_weight, teacher_bias):
        # (a teacher that requires grad: through the Function too, which gives it none)
        y = _BlendedLowRankFunction.apply(*args)
    else:
        y = _blended_forward(*args)
    return y if x.dim() == 2 else y.reshape(*lead, u.shape[0])


class PackedFactors(list):
    """The 6 tensors of ``pack_kept`` and the ``in_features`` they were packed for, which the
    tensors alone cannot tell (a column of V with no kept entry leaves no trace in them)."""

    def __init__(self, tensors: Sequence[Tensor], in_features: int):
        super().__init__(tensors)
        self.in_features = int(in_features)


def pack_kept(u: Tensor, v: Tensor) -> PackedFactors:
    """The nonzero entries of ``u [out, r]`` and ``v [in, r]`` (float32, on the CPU) grouped
    as ``packed_lowrank_linear`` reads them: V's by rank component (indices along in), then
    U's by output (indices along r); three tensors each: int64 group starts, int32 indices,
    float32 values. Entries that are zero are left out: they add nothing."""
    for name, t in (("u", u), ("v", v)):
        _check_tensor(name, t)
    reason = _CpuBackend.unavailable_reason(u.device, u.dtype) or _CpuBackend.unavailable_reason(v.device, v.dtype)
    if reason is not None:
        raise ValueError(f"pack_kept needs u and v as float32 CPU tensors and tunecomp._C: {reason}")
    u, v = u.detach(), v.detach()  # shapes: checked by pack_groups_cpu
    return PackedFactors(_C.pack_groups_cpu(u, v, u != 0, v != 0, backward=False), v.shape[0])


def packed_lowrank_linear(x: Tensor, packed: PackedFactors, bias: Optional[Tensor] = None) -> Tensor:
    """``y = (x @ v) @ u.T + bias`` from ``packed = pack_kept(u, v)`` alone: the CPU kernel's
    sparse forward (csrc/lowrank_cpu.cpp), whose work is (kept entries) x tokens. Inference
    only (no gradient), float32 on the CPU; ``x [..., in]``, ``bias [out]`` or None. The
    C++ checks ``packed`` (sizes, order, index ranges) before reading through it."""
    _check_tensor("x", x)
    _check_tensor("bias", bias, optional=True)
    reason = _CpuBackend.unavailable_reason(x.device, x.dtype)
    if reason is not None:
        raise ValueError(f"packed_lowrank_linear runs on float32 CPU tensors only: {reason}")
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim [..., in_features]; got {_describe(x)}")
    if not isinstance(packed, PackedFactors) or len(packed) != 6 or not all(isinstance(t, Tensor) for t in packed):
        raise TypeError(f"packed must be the 6 tensors of pack_kept(u, v) (a PackedFactors, which also holds "
                        f"in_features); got {type(packed).__name__}"
                        + (f" of {len(packed)}" if isinstance(packed, (list, tuple)) else ""))
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"x.shape[-1] must be the in_features the factors were packed for, "
                         f"{packed.in_features}; got x {tuple(x.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError("packed_lowrank_linear has no gradient: call it under torch.no_grad() or "
                           "torch.inference_mode(), or use masked_lowrank_linear to train")
    lead = x.shape[:-1]
    y = _packed_lowrank_linear_op(x.reshape(math.prod(lead), x.shape[-1]), list(packed), bias)
    return y.reshape(*lead, y.shape[-1])
