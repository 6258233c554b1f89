"""TuneComp and the pipelines it is compared with, under one budget.

Every method starts from the same pretrained model, trains for the same total number of
optimiser steps on the same data, and ends with the same number of parameters, counted by
``train.effective_params`` (unpruned factor entries + every untouched parameter):

- ``ft-svd``     fine-tune dense for all steps, then whitened SVD + one-shot pruning; no recovery
- ``ft-svd-ft``  fine-tune dense for half, SVD + prune, fine-tune the compressed model for half
- ``ft-kd``      fine-tune dense for half, then distil its logits into a low-rank student
                 (SVD of the fine-tuned weights), pruned gradually, for half
- ``svd-ft``     compress first (SVD + one-shot pruning), then fine-tune for all steps
- ``pc-lora``    PC-LoRA style: ``y = λ_t·W0·x + B·A·x + b`` with λ_t decaying 1→0 over the
                 first half (same curve as TuneComp's alpha), the student weighted 1,
                 randomly initialised factors (A random, B zero), no pruning, no
                 distillation loss (see below)
- ``tunecomp``   whitened init, teacher blended out over the first half (alpha_t), factors
                 pruned gradually to ρ over the same half, L1 pull, then the student alone

``level`` is the fraction of the replaced layers' weight parameters kept. Methods that prune
by ρ get factors holding ``level / (1 − ρ)`` of the dense parameters (``param_ratio``; so ρ
of their factor entries go and ``level`` remains). So ``level`` can be at most ``1 − ρ``
(``Budget`` refuses more). PC-LoRA, which does not prune, gets per layer the rank whose
factors hold as many entries as the pruning methods keep of that layer's (``pc_lora_rank``):
the same parameters up to half a rank component per layer. (Its own floor of
``level·in·out/(in+out)``, rounded to ``rank_multiple``, left it 6-24% short of them on the
benchmark's small ViT, and at ranks in multiples of 16 anywhere from half to 1.8x.)

PC-LoRA here is trained on the task loss alone: the published method (arXiv 2406.09117) adds
a feature-distillation loss against the pretrained model, which is not implemented. Its
factors A and B get no weight decay, as TuneComp's U and V (``train(no_decay=...)``).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import calibration_batches
from .prune import prune_, pruned_count
from .schedule import alpha as alpha_schedule
from .surgery import DEFAULT_TARGETS, prepare, rank_for, select_linear_layers
from .train import TrainConfig, compressible_layers, effective_params, evaluate, train

METHODS = ("ft-svd", "ft-svd-ft", "ft-kd", "svd-ft", "pc-lora", "tunecomp")


class PCLoRALinear(nn.Module):
    """``y = λ·(x·W0ᵀ) + (x·Aᵀ)·Bᵀ + b``: the frozen weight fades out under λ while a
    LoRA-initialised pair (A random, B = 0) learns to replace it; W0 is freed at λ = 0."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.in_features, self.out_features, self.rank = linear.in_features, linear.out_features, rank
        weight = linear.weight.detach()
        self.a = nn.Parameter(torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.b = nn.Parameter(torch.zeros(self.out_features, rank, device=weight.device, dtype=weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.register_buffer("teacher_weight", weight.clone())
        self.lam = 1.0

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(F.linear(x, self.a), self.b, self.bias)
        if self.teacher_weight is not None and self.lam > 0:
            y = y + self.lam * F.linear(x, self.teacher_weight)
        return y

    def set_lambda(self, value: float) -> None:
        self.lam = value
        if value == 0.0:
            self.teacher_weight = None


@dataclass(frozen=True)
class Budget:
    steps: int = 300
    level: float = 0.5  # fraction of the replaced layers' weight parameters kept
    rho: float = 0.5  # pruning ratio of the methods that prune
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    calib_batches: int = 4
    targets: tuple = DEFAULT_TARGETS
    rank_multiple: int = 1  # ranks rounded down to a multiple of it (16 on a GPU), PC-LoRA's aside

    def __post_init__(self):
        def number(name, value, ok, expected):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
                raise ValueError(f"Budget.{name} must be {expected}; got {value!r}")

        def count(name, value, least):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"Budget.{name} must be an integer >= {least}; got {value!r}")

        count("steps", self.steps, 2)  # the methods split the steps in halves
        count("batch_size", self.batch_size, 1)
        count("calib_batches", self.calib_batches, 1)
        count("rank_multiple", self.rank_multiple, 1)
        number("level", self.level, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        number("rho", self.rho, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        number("lr", self.lr, lambda v: v > 0.0, "positive")
        # The pruning methods' factors hold level / (1 - rho) of the dense parameters; above 1
        # they could not, and would end with fewer parameters than PC-LoRA at the same level.
        if self.level > (1.0 - self.rho) * (1.0 + 1e-9):
            raise ValueError(f"Budget.level must be at most 1 - rho = {1.0 - self.rho:g} (the methods "
                             f"that prune keep 1 - rho of factors at most as large as the dense "
                             f"weights); got level {self.level:g} with rho {self.rho:g}")

    @property
    def factor_ratio(self) -> float:
        """param_ratio of the factors before pruning: then ρ of their entries go and ``level`` stays."""
        return min(1.0, self.level / (1.0 - self.rho))  # min: rounding only (__post_init__)


def pc_lora_rank(in_features: int, out_features: int, budget: Budget) -> int:
    """PC-LoRA's rank for one layer: the one whose ``rank·(in + out)`` factor entries come
    nearest to what the pruning methods keep of theirs (rank at ``factor_ratio``, rounded to
    ``rank_multiple``, then ρ of each factor pruned as ``prune_`` does). Not itself rounded
    to ``rank_multiple``: that would undo the match (at ρ = 0.9 a tenth of a multiple of 16),
    and the multiple is for the fused kernels' tiles, which PC-LoRA's layers do not use."""
    rank = rank_for(in_features, out_features, param_ratio=budget.factor_ratio,
                    rank_multiple=budget.rank_multiple)
    kept = sum(n - pruned_count(budget.rho, n) for n in (out_features * rank, in_features * rank))
    return max(1, min(round(kept / (in_features + out_features)), in_features, out_features))


def _calib(data, budget: Budget) -> list:
    return calibration_batches(data.train, budget.batch_size, budget.calib_batches, budget.seed)


def _compress_now(model: nn.Module, data, budget: Budget) -> None:
    """Whitened SVD at the pruning methods' rank, then one-shot magnitude pruning to ρ."""
    prepare(model, param_ratio=budget.factor_ratio, targets=budget.targets, init="whiten",
            calib_batches=_calib(data, budget), keep_teacher=False, rank_multiple=budget.rank_multiple)
    if budget.rho > 0:
        prune_(compressible_layers(model), budget.rho)


def _config(budget: Budget, steps: int, **changes) -> TrainConfig:
    base = TrainConfig(steps=steps, batch_size=budget.batch_size, lr=budget.lr, seed=budget.seed,
                       warmup_steps=min(20, steps // 10), log_every=max(1, steps // 10),
                       progress=False, reg="none", decay_steps=0)
    return replace(base, **changes)


def run_method(method: str, make_model: Callable[[], nn.Module], data, budget: Budget, out_dir: str,
               device: str = "cpu") -> dict:
    """Run one method from ``make_model()`` (the pretrained model with a fresh head) and
    return ``{"method", "accuracy", "effective_params", "seconds", ...}``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    torch.manual_seed(budget.seed)
    start = time.perf_counter()
    model = make_model()
    half = budget.steps // 2

    def fit(m, steps, name, **changes):
        return train(m, data.train, data.test, _config(budget, steps, **changes.pop("cfg", {})),
                     os.path.join(out_dir, name), device=device, **changes)

    if method == "ft-svd":
        fit(model, budget.steps, "finetune")
        _compress_now(model, data, budget)
    elif method == "ft-svd-ft":
        fit(model, half, "finetune")
        _compress_now(model, data, budget)
        fit(model, budget.steps - half, "recover")
    elif method == "ft-kd":
        fit(model, half, "finetune")
        teacher = copy.deepcopy(model).eval()
        prepare(model, param_ratio=budget.factor_ratio, targets=budget.targets, init="whiten",
                calib_batches=_calib(data, budget), keep_teacher=False, rank_multiple=budget.rank_multiple)
        rest = budget.steps - half
        fit(model, rest, "distil", distill_from=teacher,
            cfg={"prune": budget.rho, "prune_end": rest // 2, "prune_every": 5})
    elif method == "svd-ft":
        _compress_now(model, data, budget)
        fit(model, budget.steps, "finetune")
    elif method == "pc-lora":
        layers = []
        for name, linear in select_linear_layers(model, budget.targets):
            layer = PCLoRALinear(linear, pc_lora_rank(linear.in_features, linear.out_features, budget))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            layers.append(layer)

        def fade(step):
            for layer in layers:
                layer.set_lambda(alpha_schedule(step, half))

        fit(model, budget.steps, "pc-lora", step_hook=fade,
            no_decay=[p for layer in layers for p in (layer.a, layer.b)])
        fade(budget.steps)
    else:  # tunecomp
        prepare(model, param_ratio=budget.factor_ratio, targets=budget.targets, init="whiten",
                calib_batches=_calib(data, budget), keep_teacher=True, rank_multiple=budget.rank_multiple)
        fit(model, budget.steps, "tunecomp",
            cfg={"decay_steps": half, "prune": budget.rho, "prune_end": half, "prune_every": 5,
                 "reg": "l1", "reg_weight": 1e-2})
    accuracy = evaluate(model, data.test, budget.batch_size, torch.device(device))
    return {"method": method, "accuracy": accuracy, "effective_params": effective_params(model),
            "level": budget.level, "rho": budget.rho if method != "pc-lora" else 0.0,
            "seed": budget.seed, "steps": budget.steps, "seconds": time.perf_counter() - start}
