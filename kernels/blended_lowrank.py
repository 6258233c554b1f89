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

alpha is read from a one-element float32 device tensor inside the kernels: no ``.item()``, no
recompile when it changes, CUDA-graph safe.

Backward reuses the plain backward kernels (``masked_lowrank.lowrank_backward``) with the
student scale applied in-kernel to G, dU and db, and the teacher term ``a * dY @ W0`` fused
into the dX kernel's epilogue loop. W0, b0 and alpha get no gradient.

Precision, strides, int64 offsets and autotuning: as in ``masked_lowrank`` (see its docstring).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .masked_lowrank import (
    _cfg,
    chunk_args,
    configs,
    dot_precision,
    load_tile,
    lowrank_backward,
    mask_arg,
    project_chunks,
    prune_by_registers,
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
                 prune_configs_by={"early_config_prune": prune_by_registers})
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


def blended_forward(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha):
    n_tokens, in_features = x.shape
    out_features, rank = u.shape
    y = torch.empty((n_tokens, out_features), dtype=x.dtype, device=x.device)
    mu, mu_strides = mask_arg(mask_u, u)
    mv, mv_strides = mask_arg(mask_v, v)
    bias_arg = bias if bias is not None else y
    b0_arg = teacher_bias if teacher_bias is not None else y

    def grid(meta):
        return (triton.cdiv(n_tokens, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"]))

    _blended_forward_kernel[grid](
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
    return lowrank_backward(grad_y, x, u, v, mask_u, mask_v, has_bias,
                            teacher_weight=teacher_weight, alpha=alpha)
