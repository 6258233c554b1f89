"""``FusedPrunedLowRankLinear``: a drop-in replacement for ``nn.Linear``.

The layer holds a low-rank student ``W = (U⊙Mu)·(V⊙Mv)ᵀ`` (trainable ``u``, ``v``, ``bias``;
bool masks ``mask_u``, ``mask_v``) and, while distillation runs, the frozen pretrained
teacher (``teacher_weight``, ``teacher_bias``, non-trainable buffers). Its output is

    y = alpha·(x·W0ᵀ + b0) + sqrt(1 − alpha²)·(x·Vm·Umᵀ + b)

with ``alpha`` = 1 the teacher alone and ``alpha`` = 0 the student alone; with no teacher
attached, alpha is 0. The ops run through ``tunecomp.ops`` on the backend ``self.backend``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .decompose import check_rank, init_factors
from .reference import apply_mask, student_scale


class FusedPrunedLowRankLinear(nn.Module):
    """``y = x @ (v*mask_v) @ (u*mask_u).T + bias``, optionally blended with a frozen teacher.

    Args:
        in_features, out_features: as for ``nn.Linear``.
        rank: the rank r of the factors, in [1, min(in_features, out_features)].
        bias: whether the student has a bias.
        backend: the ``tunecomp.ops`` backend, "auto" by default.

    Attributes: ``u`` [out, r], ``v`` [in, r], ``bias`` [out] (parameters); ``mask_u``,
    ``mask_v`` (bool buffers, True = kept); ``teacher_weight`` [out, in], ``teacher_bias``
    [out] (frozen buffers, None once dropped); ``alpha`` (float, saved in ``state_dict`` as
    the one-element buffer ``alpha_tensor`` that the ops read, so that a changing alpha
    recompiles nothing).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device=None,
        dtype=None,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        check_rank(rank, in_features, out_features)
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}; got {backend!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.backend = backend
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(in_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("mask_u", torch.ones(out_features, rank, dtype=torch.bool, device=device))
        self.register_buffer("mask_v", torch.ones(in_features, rank, dtype=torch.bool, device=device))
        # alpha_tensor before the teacher's two buffers: torch.export (2.14, non-strict) maps
        # a root module's buffers to graph inputs wrongly when a None buffer comes first
        self.register_buffer("alpha_tensor", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("teacher_weight", None)
        self.register_buffer("teacher_bias", None)
        self._alpha = 0.0
        self._blend = False  # teacher attached and alpha > 0: the only thing forward branches on
        self.register_load_state_dict_post_hook(FusedPrunedLowRankLinear._sync_alpha)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random factors whose product has ``nn.Linear``'s default weight variance, every
        entry kept (masks all True), alpha as set (so that a layer built on the meta device
        and materialised with ``to_empty`` is a valid one after this call).

        ``nn.Linear`` draws W ~ U(±1/sqrt(in)), variance 1/(3·in). For U, V with i.i.d.
        N(0, σ²) entries, Var((U·Vᵀ)ij) = r·σ⁴, so σ = (3·in·r)^(-1/4).
        """
        std = (3.0 * self.in_features * self.rank) ** -0.25
        nn.init.normal_(self.u, std=std)
        nn.init.normal_(self.v, std=std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.mask_u.fill_(True)
        self.mask_v.fill_(True)
        self.alpha_tensor.fill_(self._alpha)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        init: str = "svd",
        keep_teacher: bool = True,
        calib=None,
        backend: str = "auto",
    ) -> "FusedPrunedLowRankLinear":
        """A low-rank layer initialised from ``linear`` (on its device, in its dtype).

        ``init``: ``"svd"`` (truncated SVD of the weight), ``"asvd"`` or ``"whiten"``
        (activation-aware, needing ``calib``, the layer's ``CalibStats``); see
        ``tunecomp.decompose``. The student bias starts as the linear's bias. With
        ``keep_teacher`` the layer keeps a frozen copy of the weight and bias and starts at
        alpha = 1: it computes exactly what ``linear`` did until alpha is lowered. Without
        it, alpha is 0 and the student runs alone.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear; got {type(linear).__name__}")
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
            device=weight.device, dtype=weight.dtype, backend=backend,
        )
        u, v = init_factors(weight, rank, init, calib)
        layer.u.copy_(u)
        layer.v.copy_(v)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        if keep_teacher:
            layer.teacher_weight = weight.clone()
            layer.teacher_bias = None if linear.bias is None else linear.bias.detach().clone()
            layer.alpha = 1.0
        return layer

    # ---- the blend ------------------------------------------------------------------------

    @property
    def has_teacher(self) -> bool:
        return self.teacher_weight is not None

    @property
    def alpha(self) -> float:
        """The teacher's weight in the blend, in [0, 1] (0 when no teacher is attached)."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"alpha must be one number; got a tensor of shape {tuple(value.shape)}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"alpha must be a float in [0, 1]; got {type(value).__name__}")
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {value}")
        if value > 0.0 and not self.has_teacher:
            raise ValueError(f"alpha must be 0 without a teacher attached; got {value}")
        self._alpha = value
        self.alpha_tensor.fill_(value)
        self._blend = value > 0.0

    @staticmethod
    def _sync_alpha(module: "FusedPrunedLowRankLinear", incompatible_keys) -> None:
        # After load_state_dict the buffer holds the truth; mirror it on the Python side. A
        # layer without a teacher (loaded with strict=False from a blended checkpoint)
        # computes the student alone: its alpha is 0, whatever the checkpoint held. The
        # buffer is the layer's own afterwards: after load_state_dict(assign=True) it was
        # the source's tensor, which a fill here or a later alpha change would alter.
        value = float(module.alpha_tensor) if module.has_teacher else 0.0
        module.alpha_tensor = torch.full((), value, dtype=torch.float32, device=module.alpha_tensor.device)
        module._alpha = value
        module._blend = value > 0.0

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts floating buffers; alpha stays float32 (in bf16, 0.997 would
        # round to 1.0 and silence the student), refilled from the exact Python value.
        super()._apply(fn, recurse)
        if self.alpha_tensor.dtype != torch.float32:
            self.alpha_tensor = torch.full(
                (), self._alpha, dtype=torch.float32, device=self.alpha_tensor.device
            )
        return self

    def drop_teacher(self) -> None:
        """Free the teacher's weight and bias; the layer is the student alone from now on."""
        self.teacher_weight = None
        self.teacher_bias = None
        self.alpha = 0.0

    # ---- compute --------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self._blend:
            return ops.blended_lowrank_linear(
                x, self.u, self.v, self.bias, self.mask_u, self.mask_v,
                self.teacher_weight, self.teacher_bias, self.alpha_tensor, backend=self.backend,
            )
        return ops.masked_lowrank_linear(
            x, self.u, self.v, self.bias, self.mask_u, self.mask_v, backend=self.backend
        )

    @torch.no_grad()
    def merged_weight(self) -> tuple[Tensor, Optional[Tensor]]:
        """The dense ``(weight [out, in], bias [out] or None)`` this layer computes now."""
        weight = apply_mask(self.u, self.mask_u) @ apply_mask(self.v, self.mask_v).T
        bias = None if self.bias is None else self.bias.clone()
        if self._blend:
            a, s = self._alpha, student_scale(self._alpha)
            weight = a * self.teacher_weight + s * weight
            if self.teacher_bias is not None or bias is not None:
                zero = weight.new_zeros(self.out_features)
                tb = zero if self.teacher_bias is None else self.teacher_bias
                bias = a * tb + s * (zero if bias is None else bias)
        return weight, bias

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` that computes what this layer computes now (masks folded,
        the blend merged)."""
        weight, bias = self.merged_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None,
            device=weight.device, dtype=weight.dtype,
        )
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    # ---- accounting -----------------------------------------------------------------------

    def num_effective_params(self) -> int:
        """Unpruned entries of u and v plus the bias: what the compact model will store. A rank
        component with all of its u or all of its v pruned adds nothing to the output, and
        export drops it whole (``deploy.drop_dead_components``): its other side's kept
        entries are not counted."""
        alive = self.mask_u.any(0) & self.mask_v.any(0)
        kept = int(self.mask_u[:, alive].sum()) + int(self.mask_v[:, alive].sum())
        return kept + (0 if self.bias is None else self.bias.numel())

    @property
    def sparsity(self) -> float:
        """The fraction of factor entries that are pruned."""
        total = self.mask_u.numel() + self.mask_v.numel()
        return 1.0 - (int(self.mask_u.sum()) + int(self.mask_v.sum())) / total

    def extra_repr(self) -> str:
        sparsity = "unknown (meta)" if self.mask_u.is_meta else f"{self.sparsity:.1%}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}, sparsity={sparsity}, "
            f"teacher={'attached' if self.has_teacher else 'none'}, alpha={self._alpha:g}, "
            f"backend={self.backend!r}"
        )
