"""Pure-PyTorch reference of every tunecomp op: the ground truth for tests and kernels.

Written for clarity, not speed. Every backend must compute the same function as these.

Masks select which entries of the factors are kept. A pruned entry is treated as an exact
zero, selected with ``torch.where`` rather than multiplied, so a NaN or Inf stored in a pruned
entry does not leak into the output and its gradient is exactly zero. NaN/Inf in ``x`` or in
kept entries propagate as in ``nn.Linear``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor


def apply_mask(weight: Tensor, mask: Optional[Tensor]) -> Tensor:
    """``weight`` with pruned entries (``mask == False``) set to exactly zero."""
    if mask is None:
        return weight
    return torch.where(mask, weight, 0.0)  # a Python scalar: no zero tensor made per call (on a GPU, a launch)


def masked_lowrank_linear(
    x: Tensor,
    u: Tensor,
    v: Tensor,
    bias: Optional[Tensor] = None,
    mask_u: Optional[Tensor] = None,
    mask_v: Optional[Tensor] = None,
) -> Tensor:
    """``y = (x @ (v*mask_v)) @ (u*mask_u).T + bias``.

    x: [..., in], u: [out, r], v: [in, r], masks bool of the shape of u / v, bias: [out].
    The rank-r intermediate ``x @ v`` is computed first: r*(in+out) FLOPs per token instead of
    in*out for the merged weight.
    """
    t = x @ apply_mask(v, mask_v)
    y = t @ apply_mask(u, mask_u).T
    if bias is not None:
        y = y + bias
    return y


def student_scale(alpha: Union[float, Tensor]) -> Union[float, Tensor]:
    """The student's weight in the blend, ``sqrt(1 - alpha**2)``, computed as
    ``sqrt((1 - alpha)·(1 + alpha))``: for alpha near 1, ``1 - alpha`` is exact, where
    ``1 - alpha**2`` would subtract two nearly equal numbers after rounding ``alpha**2``
    (float32, alpha = 0.9995: 6e-6 of the result off instead of 5e-8)."""
    if isinstance(alpha, Tensor):
        return torch.sqrt((1.0 - alpha) * (1.0 + alpha))
    return math.sqrt((1.0 - alpha) * (1.0 + alpha))


def blend_scales(alpha: Tensor, dtype: torch.dtype) -> tuple:
    """``(alpha, sqrt(1 - alpha**2))`` as 0-dim tensors of ``dtype``, the second computed
    before either is rounded to ``dtype``: in bf16, alpha = 0.9995 rounds to 1.0, and the
    student's weight computed from that would be 0 instead of 0.032."""
    wide = alpha.reshape(()).to(torch.promote_types(dtype, torch.float32))
    return wide.to(dtype), student_scale(wide).to(dtype)


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
) -> Tensor:
    """``alpha*(x @ W0.T + b0) + sqrt(1-alpha**2) * masked_lowrank_linear(x, u, v, ...)``.

    teacher_weight W0: [out, in], teacher_bias b0: [out]. alpha in [0, 1], a number or a
    one-element tensor (then it may change between calls without recompiling anything).
    """
    teacher = torch.nn.functional.linear(x, teacher_weight, teacher_bias)
    student = masked_lowrank_linear(x, u, v, bias, mask_u, mask_v)
    if isinstance(alpha, Tensor):
        a, s = blend_scales(alpha, x.dtype)
        return a * teacher + s * student
    return alpha * teacher + student_scale(alpha) * student
