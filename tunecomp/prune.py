"""Pruning masks for the factors of ``FusedPrunedLowRankLinear`` layers, and their regulariser.

Hard shrinkage: at ratio ρ, the ρ-fraction of factor entries with the smallest magnitude is
pruned (its mask set False; the ops then treat it as an exact zero). Masks are monotone: an
entry once pruned stays pruned, so lowering ρ prunes nothing more and revives nothing.

Modes:
- ``"unstructured"`` (the paper's): any entry of U or V. Per layer, U and V are each pruned
  to the ratio (their scales can drift apart in training, and one threshold over both could
  empty one factor); global: one threshold over every layer's entries, each factor keeping
  at least its largest entry.
- ``"rank"``: whole rank components, scored by ``‖U[:, i]‖·‖V[:, i]‖`` (the Frobenius norm of
  the rank-1 term they form); per layer. The pruned components can then be removed outright.
- ``"n:m"``: in every group of m consecutive entries along a factor's reduction dimension
  (rows of V [in, r] for ``x @ V``; columns of U [out, r] for ``t @ U.T``) at most n stay: the
  2:4 pattern of sparse tensor cores when n=2, m=4. ρ is rounded down to a multiple of 1/m
  and is at most (m − n)/m.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .nn import FusedPrunedLowRankLinear

MODES = ("unstructured", "rank", "n:m")
SCOPES = ("layer", "global")

_PRUNED = -1.0  # the score of an already pruned entry: below any magnitude, so it goes first


def _scores(weight: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, weight.detach().abs().float(), torch.full_like(weight, _PRUNED, dtype=torch.float32))


def pruned_count(ratio: float, n: int) -> int:
    """How many of ``n`` entries (or components) ratio ρ < 1 prunes: ``round(ρ·n)``, but never
    all of them (at ρ = 0.95, round(9.5) = 10 of 10 would leave a layer its bias alone)."""
    return min(round(ratio * n), n - 1)


def _prune_smallest(scores: Tensor, masks: Sequence[Tensor], ratio: float, spared: int = 0) -> None:
    """Set False, across ``masks`` (flattened in order into ``scores``), the
    ``pruned_count(ratio, numel)`` lowest-scored entries; already pruned ones count towards it.
    ``spared``: how many entries are scored +inf (never pruned): the target leaves them."""
    target = min(pruned_count(ratio, scores.numel()), scores.numel() - spared)
    if target <= int((scores == _PRUNED).sum()):
        return  # monotone: never revive, and nothing more to prune
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    pruned[torch.topk(scores, target, largest=False, sorted=False).indices] = True
    offset = 0
    for mask in masks:
        n = mask.numel()
        mask.view(-1).logical_and_(~pruned[offset:offset + n])
        offset += n


def _check_ratio(ratio: float) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a float in [0, 1); got {type(ratio).__name__}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1); got {ratio}")


@torch.no_grad()
def prune_unstructured_(layers: Iterable[FusedPrunedLowRankLinear], ratio: float, scope: str = "layer") -> None:
    """Prune the smallest-magnitude entries of U and V to exactly ``ratio`` (see module doc)."""
    _check_ratio(ratio)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    layers = list(layers)
    if scope == "global" and layers:
        masks = [m for layer in layers for m in (layer.mask_u, layer.mask_v)]
        scores = [_scores(w, m).view(-1) for layer in layers for w, m in ((layer.u, layer.mask_u), (layer.v, layer.mask_v))]
        # Each factor keeps its largest entry: one threshold over layers whose scales differ
        # (100x in a reproducer) could prune a whole factor, leaving its layer its bias alone
        # (what pruned_count spares a factor pruned on its own).
        for score in scores:
            score[score.argmax()] = float("inf")
        _prune_smallest(torch.cat(scores), masks, ratio, spared=len(scores))
        return
    for layer in layers:
        for weight, mask in ((layer.u, layer.mask_u), (layer.v, layer.mask_v)):
            _prune_smallest(_scores(weight, mask).view(-1), [mask], ratio)


@torch.no_grad()
def prune_rank_(layers: Iterable[FusedPrunedLowRankLinear], ratio: float) -> None:
    """Prune whole rank components, the ``round(ratio·r)`` weakest of each layer (all but one
    at most)."""
    _check_ratio(ratio)
    for layer in layers:
        u = torch.where(layer.mask_u, layer.u, 0).float()
        v = torch.where(layer.mask_v, layer.v, 0).float()
        alive = layer.mask_u.any(0) | layer.mask_v.any(0)
        strength = torch.where(alive, u.norm(dim=0) * v.norm(dim=0), torch.full_like(u[0], _PRUNED))
        dead = torch.zeros_like(alive)
        target = pruned_count(ratio, layer.rank)
        if target > int((~alive).sum()):
            dead[torch.topk(strength, target, largest=False).indices] = True
        layer.mask_u[:, dead] = False
        layer.mask_v[:, dead] = False


def _check_groups(weight: Tensor, m: int, dim: int, what: str) -> None:
    if weight.shape[dim] % m:
        raise ValueError(
            f"n:m pruning needs {what} to be a multiple of m={m}; got {weight.shape[dim]}"
        )


def _prune_groups_(weight: Tensor, mask: Tensor, per_group: int, m: int, dim: int) -> None:
    # groups of m consecutive entries along `dim`, moved to the last axis
    scores = _scores(weight, mask).movedim(dim, -1)
    grouped = scores.reshape(*scores.shape[:-1], -1, m)
    lowest = grouped.argsort(dim=-1)[..., :per_group]
    keep = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, lowest, False)
    keep = keep.reshape(scores.shape).movedim(-1, dim)
    mask.logical_and_(keep)


@torch.no_grad()
def prune_n_m_(layers: Iterable[FusedPrunedLowRankLinear], ratio: float, n: int = 2, m: int = 4) -> None:
    """N:M pruning along each factor's reduction dim; ``ratio`` ≤ (m−n)/m, floored to k/m."""
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if not (0 < n < m):
        raise ValueError(f"n:m needs 0 < n < m; got {n}:{m}")
    _check_ratio(ratio)
    if not 0.0 <= ratio <= (m - n) / m + 1e-9:
        raise ValueError(f"ratio for {n}:{m} pruning must be in [0, {(m - n) / m:g}]; got {ratio}")
    per_group = int(ratio * m + 1e-9)
    if per_group == 0:
        return
    layers = list(layers)
    for layer in layers:  # every layer checked before any mask changes
        _check_groups(layer.v, m, 0, "in_features (V's reduction dim)")
        _check_groups(layer.u, m, 1, "the rank (U's reduction dim)")
    for layer in layers:
        _prune_groups_(layer.v, layer.mask_v, per_group, m, 0)
        _prune_groups_(layer.u, layer.mask_u, per_group, m, 1)


def prune_(layers: Iterable[FusedPrunedLowRankLinear], ratio: float, mode: str = "unstructured",
           scope: str = "layer", n: int = 2, m: int = 4) -> None:
    """Prune ``layers`` to ``ratio`` in ``mode`` (one of ``MODES``), in place."""
    if mode == "unstructured":
        prune_unstructured_(layers, ratio, scope)
    elif mode == "rank":
        if scope != "layer":
            raise ValueError(f"rank pruning works per layer; got scope={scope!r}")
        prune_rank_(layers, ratio)
    elif mode == "n:m":
        if scope != "layer":
            raise ValueError(f"n:m pruning works per group of m entries; got scope={scope!r}")
        prune_n_m_(layers, ratio, n, m)
    else:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def sparsity_penalty(layers: Iterable[FusedPrunedLowRankLinear], mode: str = "unstructured") -> Tensor:
    """The regulariser that pulls factor entries towards pruning, averaged: the size of the
    loss term λ·penalty does not depend on the model size, but each entry's gradient is λ/N.

    ``"unstructured"`` and ``"n:m"``: L1, the sum of |kept entries| of U and V over the number
    N of factor entries. ``"rank"``: group lasso, the sum over components of
    ``‖U[:, i]‖ + ‖V[:, i]‖`` over the number of components. Pruned entries add nothing.

    So the pull per entry shrinks as the model grows. At the default λ = 1e-2 it is 9.1e-8 on
    the accuracy benchmark's small ViT (110k factor entries, where the task loss's gradients
    have a median of 3e-4) and 2.4e-10 on ViT-B/16 at half its linear parameters (42M
    entries), below AdamW's eps: weak beside the task loss at either size.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    total, count = None, 0
    for layer in layers:
        u = torch.where(layer.mask_u, layer.u, 0)
        v = torch.where(layer.mask_v, layer.v, 0)
        if mode == "rank":
            term = u.norm(dim=0).sum() + v.norm(dim=0).sum()
            count += layer.rank
        else:
            term = u.abs().sum() + v.abs().sum()
            count += layer.u.numel() + layer.v.numel()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("sparsity_penalty needs at least one layer")
    return total / count
