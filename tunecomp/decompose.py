"""Initialisation of the low-rank student ``W ≈ U·Vᵀ`` from a pretrained weight.

``"svd"``: plain truncated SVD. With ``W = P·diag(s)·Qᵀ`` (singular values descending),
``U = P[:, :r]·diag(sqrt(s[:r]))`` and ``V = Q[:, :r]·diag(sqrt(s[:r]))``: the best rank-r
approximation of W in Frobenius and spectral norm (Eckart–Young), with the singular values
split evenly between the factors so that U and V have the same scale (which keeps their
gradients and an L1 penalty on their entries balanced).

Activation-aware inits use calibration statistics of the layer's input x (``CalibStats``:
the Gram matrix ``G = Σ xᵀx`` over tokens and the mean |x| per input channel), because what
matters is the error of the layer's *output* on real inputs, ``‖(W − U·Vᵀ)·Xᵀ‖``, not of W:

``"asvd"`` (ASVD, Yuan et al. 2023): scale W's input columns by ``s = mean|x|^β``
(β = 0.5), ``W·diag(s) ≈ P_r·Σ_r·Q_rᵀ``, then undo the scaling on V:
``U = P_r·sqrt(Σ_r)``, ``V = diag(1/s)·Q_r·sqrt(Σ_r)``. Channels that carry large activations
are approximated more accurately.

``"whiten"`` (SVD-LLM, Wang et al. 2024): with the Cholesky factor ``S`` of
``G + εI = S·Sᵀ``, ``‖(W − W')·Xᵀ‖_F = ‖(W − W')·S‖_F``, so the truncated SVD of ``W·S``
``≈ P_r·Σ_r·Q_rᵀ`` is the best rank-r approximation in output error:
``U = P_r·sqrt(Σ_r)``, ``V = S⁻ᵀ·Q_r·sqrt(Σ_r)``. ε starts at 1e-6·mean(diag G) and grows
tenfold until the factorisation succeeds, so rank-deficient statistics (fewer tokens than
channels, dead channels) are regularised rather than fatal.

Both activation-aware inits end with ``balance``: each rank component rescaled so that its
U and V columns have equal norms (the product is unchanged).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

INITS = ("svd", "asvd", "whiten")
ASVD_EXPONENT = 0.5


def check_rank(rank, in_features: int, out_features: int) -> int:
    """``rank`` as an int in [1, min(in, out)], or a ``ValueError``/``TypeError`` saying why."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):  # numpy ints too
        raise TypeError(f"rank must be an int; got {type(rank).__name__} {rank!r}")
    rank = int(rank)
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


@dataclass
class CalibStats:
    """Statistics of one layer's input over calibration tokens."""

    gram: Tensor  # [in, in], Σ xᵀx
    abs_sum: Tensor  # [in], Σ |x|
    tokens: int = 0

    @property
    def abs_mean(self) -> Tensor:
        return self.abs_sum / max(self.tokens, 1)

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.abs_sum.add_(x.abs().sum(0))
        self.tokens += x.shape[0]


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    batches: Iterable,
    names: Iterable[str],
    max_batches: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """``{name: CalibStats}`` for the ``nn.Linear`` layers ``names`` of ``model``, from
    forward hooks over ``batches`` (tensors, or tuples whose first item is the input, as a
    DataLoader gives; a single tensor is one batch), cast to the model's device and dtype.

    ``dtype`` is the accumulation type of the Gram matrices (float32 by default: a 3072-wide
    layer's Gram matrix is 36 MiB; float64 doubles that for more exact sums).
    """
    stats, hooks = {}, []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{name} must be an nn.Linear to collect input statistics; got {type(layer).__name__}")
        device = layer.weight.device
        stats[name] = CalibStats(
            torch.zeros(layer.in_features, layer.in_features, dtype=dtype, device=device),
            torch.zeros(layer.in_features, dtype=dtype, device=device),
        )
        hooks.append(layer.register_forward_pre_hook(lambda mod, args, s=stats[name]: s.update(args[0])))
    if isinstance(batches, torch.Tensor):
        batches = [batches]  # iterating would give its images one by one, without a batch dim
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"calibration batch {i} must be a tensor (or a tuple starting with one); "
                                f"got {type(x).__name__}")
            x = x.to(param.device, dtype=param.dtype if x.is_floating_point() else x.dtype)
            try:
                model(x)
            except (RuntimeError, ValueError, AssertionError) as error:
                raise ValueError(f"calibration batch {i} of shape {tuple(x.shape)} does not fit the model "
                                 f"({type(error).__name__}: {error})") from error
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    empty = [name for name, s in stats.items() if s.tokens == 0]
    if empty:
        raise ValueError(f"no calibration tokens reached {empty[:4]}: is batches empty?")
    broken = [name for name, s in stats.items() if not (s.gram.isfinite().all() and s.abs_sum.isfinite().all())]
    if broken:  # the inits would fail in a factorisation (LinAlgError) or give NaN factors
        raise ValueError(f"the calibration inputs of {broken[:4]} hold NaN or inf: check the batches and the "
                         f"model's weights")
    return stats


def _split(p: Tensor, s: Tensor, q: Tensor, rank: int) -> tuple:
    root = s[:rank].sqrt()
    return p[:, :rank] * root, q[:, :rank] * root


def balance(u: Tensor, v: Tensor) -> tuple:
    """Rescale each rank component so that ``‖U[:, i]‖ = ‖V[:, i]‖`` (``U·Vᵀ`` unchanged).

    The activation-aware inits map V back through ``diag(1/s)`` or ``S⁻ᵀ``, which can leave
    the two factors orders of magnitude apart; balanced factors get comparable gradients,
    a fair L1 penalty, and magnitude pruning that does not wipe out one factor.
    """
    u_norm, v_norm = u.norm(dim=0), v.norm(dim=0)
    scale = torch.where((u_norm > 0) & (v_norm > 0), (v_norm / u_norm).sqrt(), torch.ones_like(u_norm))
    return u * scale, v / scale


@torch.no_grad()
def asvd_factors(weight: Tensor, stats: CalibStats, rank: int, exponent: float = ASVD_EXPONENT) -> tuple:
    """ASVD factors (see the module doc), returned in ``weight``'s dtype and device."""
    check_rank(rank, weight.shape[1], weight.shape[0])
    w = weight.to(torch.float64)
    scale = stats.abs_mean.to(w).pow(exponent)
    scale = scale.clamp_min(scale.max().clamp_min(1e-12) * 1e-6)  # dead channels: no 1/0
    p, s, qh = torch.linalg.svd(w * scale, full_matrices=False)
    u, v = balance(*_split(p, s, qh.T, rank))
    u, v = balance(u, v / scale[:, None])
    return u.to(weight.dtype), v.to(weight.dtype)


def _regularised_cholesky(gram: Tensor) -> Tensor:
    """Cholesky factor of ``gram + ε·diag(scale)``, ε = 1e-6 (×10 until it succeeds), each
    channel regularised by its own scale: ε times the mean diagonal over-regularised every
    other channel by the size of one outlier channel (activations of 1e4x the typical scale
    took whitening to 1.5x the optimal output error). Dead channels get a floor."""
    diagonal = gram.diagonal()
    scale = torch.diag(diagonal.clamp_min(1e-6 * diagonal.mean().clamp_min(1e-12)))
    eps = 1e-6
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(gram + eps * scale)
        if int(info) == 0:
            return factor
        eps = eps * 10
    raise ValueError("the calibration Gram matrix stays singular after regularisation (NaN in it?)")


@torch.no_grad()
def whiten_factors(weight: Tensor, stats: CalibStats, rank: int) -> tuple:
    """SVD-LLM whitening factors (see the module doc), in ``weight``'s dtype and device."""
    check_rank(rank, weight.shape[1], weight.shape[0])
    w = weight.to(torch.float64)
    chol = _regularised_cholesky(stats.gram.to(w))
    p, s, qh = torch.linalg.svd(w @ chol, full_matrices=False)
    u, q_root = _split(p, s, qh.T, rank)
    v = torch.linalg.solve_triangular(chol.T, q_root, upper=True)  # S⁻ᵀ·Q_r·sqrt(Σ_r)
    u, v = balance(u, v)
    return u.to(weight.dtype), v.to(weight.dtype)


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}; got {init!r}")


def init_factors(weight: Tensor, rank: int, init: str = "svd", calib: Optional[CalibStats] = None) -> tuple:
    """``(U, V)`` for ``weight`` by ``init`` (one of ``INITS``); asvd/whiten need ``calib``."""
    check_init(init)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features]; got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if init == "svd":
        return svd_factors(weight, rank)
    if not isinstance(calib, CalibStats):
        raise ValueError(f"init={init!r} needs calib=CalibStats of the layer's inputs (collect_stats); got {type(calib).__name__}")
    if calib.gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"calib was collected for {calib.gram.shape[0]} input channels; the weight has {weight.shape[1]}")
    return (asvd_factors if init == "asvd" else whiten_factors)(weight, calib, rank)
