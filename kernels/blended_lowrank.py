"""Triton kernels of the teacher/student blend (forward and backward, side by side)::

    y = a * (x @ W0.T + b0) + s * ((x @ Vm) @ Um.T + bias),   s = sqrt(1 - a*a)

Forward design (one launch, one pass over X): grid ``(cdiv(N, BLOCK_M), cdiv(out, BLOCK_N))``,
one output tile per program. A single K loop over ``in`` loads each X tile once and feeds it
to both the teacher GEMM (``acc += X_tile @ W0_tile.T``) and the student's rank projection
(``T += X_tile @ Vm_tile``, T held in registers in rank chunks as in the plain forward).
After the loop: ``student = T @ Um_tile.T + bias``, ``y = a * (acc + b0) + s * student``, with
the blend in fp32 and one store.

T is recomputed per output tile: the dense teacher GEMM dominates (``BLOCK_N`` columns of W0 per
tile against the rank's columns of V), and recomputing keeps X read once per tile with no extra
launch. A GPU measurement should decide against the alternative DESIGN.md names, a tiny first
pass producing T (N x r) before a teacher GEMM with the student epilogue; recompute costs
``rank / BLOCK_N`` extra FLOPs relative to the teacher (e.g. 2x at r=256 with BLOCK_N=128).

From ``n·(in + out) > in·out`` tokens (``tunecomp.ops.folding_pays``) the forward instead
folds the student into the teacher's weight, ``W = a·W0 + s·Um·Vmᵀ`` (``_fold_kernel``, one
launch, ``r·in·out`` multiply-adds whatever n), and leaves ``y = x·Wᵀ + (a·b0 + s·b)`` to
cuBLAS: fewer FLOPs than the fused kernel's teacher GEMM plus student, and X read once.

alpha is read from a one-element float32 device tensor inside the kernels: no ``.item()``, no
recompile when it changes, CUDA-graph safe.

Backward reuses the plain backward kernels (``masked_lowrank.lowrank_backward``) with the
student scale applied in-kernel to G, dU and db, and the teacher term ``a * dY @ W0`` fused
into the dX kernel's epilogue loop; from ``n > out`` tokens (``folding_pays_backward``) dX is
``dY @ W`` with the folded W, by cuBLAS. W0, b0 and alpha get no gradient.

Precision, strides, int64 offsets and autotuning: as in ``masked_lowrank`` (see its docstring).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv
from .masked_lowrank import (
    DISK_CACHE,
    _cfg,
    chunk_args,
    configs,
    dot_precision,
    launch,
    load_masked_tile,
    load_tile,
    lowrank_backward,
    mask_arg,
    project_chunks,
    prune_forward_configs,
    store_tile,
    student_scale,
    times_um_t,
    token_bucket,
)

BLENDED_FORWARD_GPU_CONFIGS = [
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=256, BLOCK_K=32, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    # large ranks (256-512): 3-4 stages, as a masked V tile gets num_stages - 1 buffers
    # (masked_lowrank's "Pipelining"); at 2 stages, for few tokens, every K step waits
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=8, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=2),
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2),
    _cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=1),
]
_BLENDED_FORWARD_CONFIGS = configs(BLENDED_FORWARD_GPU_CONFIGS,
                                   _cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), one_config=-1)


@triton.autotune(configs=_BLENDED_FORWARD_CONFIGS,
                 key=["n_bucket", "in_features", "out_features", "R0", "R1", "R2", "N_CHUNKS",
                      "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_forward_configs},
                 cache_results=DISK_CACHE)
@triton.jit(do_not_specialize=["n_bucket"])  # n_bucket: for the autotune key only
def _blended_forward_kernel(
    x_ptr, u_ptr, v_ptr, bias_ptr, mask_u_ptr, mask_v_ptr, w_ptr, b0_ptr, alpha_ptr, y_ptr,
    n_tokens, in_features, out_features, rank, n_bucket,
    stride_xm, stride_xk, stride_u0, stride_u1, stride_v0, stride_v1,
    stride_mu0, stride_mu1, stride_mv0, stride_mv1, stride_b, stride_w0, stride_w1, stride_b0,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr,
    HAS_MASK_U: tl.constexpr, HAS_MASK_V: tl.constexpr,
    R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, N_CHUNKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # T's column chunks (masked_lowrank.rank_chunks); one past N_CHUNKS is never read
    offs_r0 = tl.arange(0, R0).to(tl.int64)
    offs_r1 = R0 + tl.arange(0, R1).to(tl.int64)
    offs_r2 = R0 + R1 + tl.arange(0, R2).to(tl.int64)

    teacher = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t0 = tl.zeros((BLOCK_M, R0), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_M, R1), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_M, R2), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x_tile = load_tile(x_ptr, offs_m, offs_k, n_tokens, in_features, stride_xm, stride_xk)
        # W0.T tile [BLOCK_K, BLOCK_N]: W0 [out, in] read with swapped strides.
        wt_tile = load_tile(w_ptr, offs_k, offs_n, in_features, out_features,
                            stride_w1, stride_w0)
        teacher = tl.dot(x_tile, wt_tile, teacher, input_precision=DOT_PRECISION)
        t0, t1, t2 = project_chunks(x_tile, t0, t1, t2, v_ptr, mask_v_ptr, offs_k,
                                    offs_r0, offs_r1, offs_r2, in_features, rank,
                                    stride_v0, stride_v1, stride_mv0, stride_mv1,
                                    HAS_MASK_V, N_CHUNKS, DOT_PRECISION)

    dtype = x_ptr.dtype.element_ty
    student = times_um_t(t0.to(dtype), t1.to(dtype), t2.to(dtype), u_ptr, mask_u_ptr,
                         offs_r0, offs_r1, offs_r2, offs_n, rank, out_features,
                         stride_u0, stride_u1, stride_mu0, stride_mu1,
                         HAS_MASK_U, N_CHUNKS, DOT_PRECISION)
    n_ok = offs_n < out_features
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n * stride_b, mask=n_ok, other=0.0)
        student += b.to(tl.float32)[None, :]
    if HAS_TEACHER_BIAS:
        b0 = tl.load(b0_ptr + offs_n * stride_b0, mask=n_ok, other=0.0)
        teacher += b0.to(tl.float32)[None, :]
    a, s = student_scale(alpha_ptr)
    y = a * teacher + s * student
    store_tile(y_ptr, offs_m, offs_n, n_tokens, out_features, stride_ym, stride_yn, y)


# The fold (tunecomp.ops.folding_pays): W = a·W0 + s·Um·Vmᵀ [out, in], one program per
# [BLOCK_O, BLOCK_I] tile of W, a K loop over the rank with both masks applied on load, the
# teacher term added in fp32 in the epilogue and W rounded once to the factors' dtype. The
# programs of W's first column of tiles also write the folded bias a·b0 + s·b.
FOLD_GPU_CONFIGS = [
    _cfg(BLOCK_O=128, BLOCK_I=128, BLOCK_R=32, num_warps=8, num_stages=3),
    _cfg(BLOCK_O=64, BLOCK_I=128, BLOCK_R=32, num_warps=4, num_stages=3),
    _cfg(BLOCK_O=64, BLOCK_I=64, BLOCK_R=32, num_warps=4, num_stages=3),
    _cfg(BLOCK_O=32, BLOCK_I=64, BLOCK_R=16, num_warps=4, num_stages=2),
]
_FOLD_CONFIGS = configs(FOLD_GPU_CONFIGS, _cfg(BLOCK_O=16, BLOCK_I=16, BLOCK_R=16), one_config=-1)


@triton.autotune(configs=_FOLD_CONFIGS, key=["out_features", "in_features", "rank", "DOT_PRECISION"],
                 cache_results=DISK_CACHE)
@triton.jit
def _fold_kernel(
    u_ptr, v_ptr, mask_u_ptr, mask_v_ptr, w0_ptr, alpha_ptr, w_ptr,
    bias_ptr, b0_ptr, folded_bias_ptr,
    out_features, in_features, rank,
    stride_u0, stride_u1, stride_v0, stride_v1, stride_mu0, stride_mu1, stride_mv0, stride_mv1,
    stride_w00, stride_w01, stride_w0, stride_w1, stride_b, stride_b0,
    HAS_MASK_U: tl.constexpr, HAS_MASK_V: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_o = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        u_tile = load_masked_tile(u_ptr, mask_u_ptr, offs_o, offs_r, out_features, rank,
                                  stride_u0, stride_u1, stride_mu0, stride_mu1, HAS_MASK_U)
        # Vm.T tile [BLOCK_R, BLOCK_I]: v [in, r] and its mask read with swapped strides
        vt_tile = load_masked_tile(v_ptr, mask_v_ptr, offs_r, offs_i, rank, in_features,
                                   stride_v1, stride_v0, stride_mv1, stride_mv0, HAS_MASK_V)
        acc = tl.dot(u_tile, vt_tile, acc, input_precision=DOT_PRECISION)
    a, s = student_scale(alpha_ptr)
    w0 = load_tile(w0_ptr, offs_o, offs_i, out_features, in_features, stride_w00, stride_w01)
    store_tile(w_ptr, offs_o, offs_i, out_features, in_features, stride_w0, stride_w1,
               a * w0.to(tl.float32) + s * acc)
    if HAS_BIAS or HAS_TEACHER_BIAS:
        if tl.program_id(1) == 0:
            o_ok = offs_o < out_features
            folded = tl.zeros((BLOCK_O,), dtype=tl.float32)
            if HAS_BIAS:
                folded += s * tl.load(bias_ptr + offs_o * stride_b, mask=o_ok, other=0.0).to(tl.float32)
            if HAS_TEACHER_BIAS:
                folded += a * tl.load(b0_ptr + offs_o * stride_b0, mask=o_ok, other=0.0).to(tl.float32)
            tl.store(folded_bias_ptr + offs_o, folded.to(folded_bias_ptr.dtype.element_ty), mask=o_ok)


def fold(u, v, mask_u, mask_v, teacher_weight, alpha, bias=None, teacher_bias=None):
    """``(W, b)``: ``W = a·W0 + s·Um·Vmᵀ`` [out, in] and ``b = a·b0 + s·bias`` [out] (None when
    neither bias is given), in u's dtype, from one launch."""
    out_features, rank = u.shape
    in_features = v.shape[0]
    w = torch.empty((out_features, in_features), dtype=u.dtype, device=u.device)
    has_bias = bias is not None or teacher_bias is not None
    folded_bias = torch.empty(out_features if has_bias else 0, dtype=u.dtype, device=u.device)
    mu, mu_strides = mask_arg(mask_u, u)
    mv, mv_strides = mask_arg(mask_v, v)

    def grid(meta):
        return (cdiv(out_features, meta["BLOCK_O"]), cdiv(in_features, meta["BLOCK_I"]))

    launch(_fold_kernel, grid,
        u, v, mu, mv, teacher_weight, alpha, w,
        bias if bias is not None else w, teacher_bias if teacher_bias is not None else w,
        folded_bias if has_bias else w,
        out_features, in_features, rank,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), *mu_strides, *mv_strides,
        teacher_weight.stride(0), teacher_weight.stride(1), w.stride(0), w.stride(1),
        bias.stride(0) if bias is not None else 0,
        teacher_bias.stride(0) if teacher_bias is not None else 0,
        HAS_MASK_U=mask_u is not None, HAS_MASK_V=mask_v is not None,
        HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher_bias is not None,
        DOT_PRECISION=dot_precision(u.dtype),
    )
    return w, (folded_bias if has_bias else None)


def blended_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha):
    from .. import ops  # the rule the other backends follow; imported here: ops imports us

    if ops.folding_pays(*x.shape, u.shape[0]):  # one fold launch, then cuBLAS's dense GEMM
        w, b = fold(u, v, mask_u, mask_v, teacher_weight, alpha, bias, teacher_bias)
        return torch.nn.functional.linear(x, w, b)
    return two_branch_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha)


def two_branch_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha):
    """The blend as one fused launch: teacher GEMM and student side by side (module docstring)."""
    n_tokens, in_features = x.shape
    out_features, rank = u.shape
    y = torch.empty((n_tokens, out_features), dtype=x.dtype, device=x.device)
    mu, mu_strides = mask_arg(mask_u, u)
    mv, mv_strides = mask_arg(mask_v, v)
    bias_arg = bias if bias is not None else y
    b0_arg = teacher_bias if teacher_bias is not None else y

    def grid(meta):
        return (cdiv(n_tokens, meta["BLOCK_M"]), cdiv(out_features, meta["BLOCK_N"]))

    launch(_blended_forward_kernel, grid,
        x, u, v, bias_arg, mu, mv, teacher_weight, b0_arg, alpha, y,
        n_tokens, in_features, out_features, rank, token_bucket(n_tokens),
        x.stride(0), x.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        *mu_strides, *mv_strides, bias.stride(0) if bias is not None else 0,
        teacher_weight.stride(0), teacher_weight.stride(1),
        teacher_bias.stride(0) if teacher_bias is not None else 0,
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_TEACHER_BIAS=teacher_bias is not None,
        HAS_MASK_U=mask_u is not None, HAS_MASK_V=mask_v is not None,
        **chunk_args(rank), DOT_PRECISION=dot_precision(x.dtype),
    )
    return y


def blended_backward(grad_y, x, u, v, mask_u, mask_v, teacher_weight, alpha, has_bias):
    from .. import ops

    folded = None
    if ops.folding_pays_backward(x.shape[0], u.shape[0]):  # grad_x = grad_y·W by cuBLAS
        folded, _ = fold(u, v, mask_u, mask_v, teacher_weight, alpha)
    return lowrank_backward(grad_y, x, u, v, mask_u, mask_v, has_bias,
                            teacher_weight=teacher_weight, alpha=alpha, folded_weight=folded)
