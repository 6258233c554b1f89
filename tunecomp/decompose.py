"""Initialisation of the low-rank student ``W ≈ U·Vᵀ`` from a pretrained weight.

``"svd"``: plain truncated SVD. With ``W = P·diag(s)·Qᵀ`` (singular values descending),
``U = P[:, :r]·diag(sqrt(s[:r]))`` and ``V = Q[:, :r]·diag(sqrt(s[:r]))``: the best rank-r
approximation of W in Frobenius and spectral norm (Eckart–Young), with the singular values
split evenly between the factors so that U and V have the same scale (which keeps their
gradients and an L1 penalty on their entries balanced).

The activation-aware initialisations (ASVD scaling, SVD-LLM whitening) come with the
training loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

INITS = ("svd",)


def check_rank(rank, in_features: int, out_features: int) -> int:
    """``rank`` as an int in [1, min(in, out)], or a ``ValueError``/``TypeError`` saying why."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int; got {type(rank).__name__} {rank!r}")
    full = min(in_features, out_features)
    if not 1 <= rank <= full:
        raise ValueError(
            f"rank must be in [1, min(in_features, out_features)] = [1, {full}] for a "
            f"{in_features}->{out_features} layer; got {rank}"
        )
    return rank


@torch.no_grad()
def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Truncated-SVD factors ``(U [out, r], V [in, r])`` with ``U @ V.T ≈ weight``.

    Computed in float64 (an SVD in fp16/bf16 is not available and fp32 loses digits that a
    full-rank round trip should keep), returned in ``weight``'s dtype and device.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in]; got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    check_rank(rank, in_features, out_features)
    p, s, qh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    u = p[:, :rank] * root
    v = qh[:rank].T * root
    return u.to(weight.dtype), v.to(weight.dtype)
