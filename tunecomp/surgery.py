"""Find the ``nn.Linear`` layers of a model by name and swap them for low-rank layers, in place.

Works on any ``nn.Module``; the default targets are the four linear layers of every timm
ViT block. The classifier head is never replaced unless asked (``include_head=True``).
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from torch import nn

from .decompose import check_init, collect_stats
from .nn import FusedPrunedLowRankLinear

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def name_matches(name: str, pattern: str) -> bool:
    """True when ``name`` (a module's qualified name) is ``pattern``, ends with
    ``"." + pattern``, or matches it as a glob (``blocks.1?.mlp.*``)."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def rank_for(
    in_features: int,
    out_features: int,
    rank: Optional[int] = None,
    rank_ratio: Optional[float] = None,
    param_ratio: Optional[float] = None,
    rank_multiple: int = 1,
) -> int:
    """The rank for one layer, from exactly one of:

    - ``rank``: absolute, capped at full rank ``min(in, out)``;
    - ``rank_ratio`` in (0, 1]: a fraction of full rank, rounded, at least 1;
    - ``param_ratio`` in (0, 1]: the largest rank whose factors hold at most this fraction
      of the dense weight's parameters, ``floor(ratio·in·out / (in+out))``, at least 1 (the
      floor forgives a relative 1e-9: a ratio computed as 0.75 / (1 − ρ) · (1 − ρ) may come
      out one ulp below 0.75, and a rank short).

    ``rank_multiple``: round the rank down to a multiple of it (at least one multiple, at
    most full rank): 4 for 2:4 pruning of U along the rank, 16 or 64 for tensor-core tiles.
    """
    if not _is_int(rank_multiple) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be a positive int; got {rank_multiple!r}")
    rank_multiple = int(rank_multiple)
    given = {k: v for k, v in
             (("rank", rank), ("rank_ratio", rank_ratio), ("param_ratio", param_ratio))
             if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank, rank_ratio, param_ratio; got {given or 'none'}")
    full = min(in_features, out_features)
    if rank is not None:
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"rank must be a positive int; got {rank!r}")
        r = int(rank)
    else:
        (name, ratio), = given.items()
        if isinstance(ratio, bool) or not (isinstance(ratio, numbers.Real) and 0.0 < ratio <= 1.0):
            raise ValueError(f"{name} must be in (0, 1]; got {ratio!r}")
        if rank_ratio is not None:
            r = round(rank_ratio * full)
        else:
            r = math.floor(param_ratio * in_features * out_features / (in_features + out_features)
                           * (1 + 1e-9))
    r = max(1, min(r, full))
    if rank_multiple > 1:
        r = min(max(rank_multiple, r - r % rank_multiple), full)
    return r


def _is_int(value) -> bool:
    """An integer (NumPy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class ReplacedLayer:
    name: str
    in_features: int
    out_features: int
    rank: int
    params_before: int
    params_after: int


@dataclass
class SurgeryReport:
    """What ``replace_linear_layers`` replaced. ``str(report)`` is a table."""

    layers: list = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Parameters after over before, over the replaced layers."""
        return self.params_after / max(self.params_before, 1)

    def __str__(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'in':>5} {'out':>5} {'rank':>5} {'before':>10} {'after':>10}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}}  {layer.in_features:>5} {layer.out_features:>5} "
                f"{layer.rank:>5} {layer.params_before:>10,} {layer.params_after:>10,}"
            )
        lines.append(
            f"{len(self.layers)} layers replaced: {self.params_before:,} -> {self.params_after:,} "
            f"parameters ({self.ratio:.1%})"
        )
        return "\n".join(lines)


def _classifier_names(model: nn.Module) -> set:
    names = {name for name, _ in model.named_modules() if name.split(".")[0] in ("head", "classifier")}
    heads = set()
    for module in model.modules():  # timm models name their classifier(s) themselves, also
        get_classifier = getattr(module, "get_classifier", None)  # inside a wrapper
        if callable(get_classifier):
            try:
                found = get_classifier()
            except TypeError:  # another method of that name, which takes arguments
                continue
            # distilled DeiT: (head, head_dist)
            heads |= {id(h) for h in (found if isinstance(found, (tuple, list)) else (found,))}
    return names | {name for name, module in model.named_modules() if id(module) in heads}


@functools.lru_cache(maxsize=None)
def _reads_weight(parent: type, child: str) -> bool:
    """Whether the forward of module class ``parent`` reads ``self.<child>.weight`` itself
    (timm's BEiT and EVA attention: ``F.linear(x, self.qkv.weight, qkv_bias)``), which a
    low-rank layer lacks."""
    try:
        source = inspect.getsource(parent.forward)
    except (OSError, TypeError):  # no source to read: assume not
        return False
    return re.search(rf"\bself\.{re.escape(child)}\.weight\b", source) is not None


def select_linear_layers(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS,
                         include_head: bool = False) -> list:
    """``[(name, nn.Linear)]`` matching ``targets``; a ``ValueError`` listing the model's
    linear layers when none does or a target given matches none, and one naming them when a
    chosen weight is reached under several names (shared or tied)."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(p.strip() for p in targets)  # "attn.qkv, mlp.fc1" as typed
    named = targets != DEFAULT_TARGETS  # the defaults may name layers a model lacks (no attn)
    skip = set() if include_head else _classifier_names(model)
    # every name (named_modules skips a module's second one): a layer reached twice is refused
    linears = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Linear]
    chosen = [(name, m) for name, m in linears
              if name not in skip and any(name_matches(name, p) for p in targets)]
    shown = ", ".join(name for name, _ in linears[:8]) or "none"
    shown += " ..." if len(linears) > 8 else ""
    where = f"(classifier head {'included' if include_head else 'excluded'}); linear layers here: {shown}"
    if not chosen:
        raise ValueError(f"no nn.Linear matches targets {targets} {where}")
    unmatched = [p for p in targets if named and not any(name_matches(name, p) for name, _ in chosen)]
    if unmatched:
        raise ValueError(f"targets {unmatched} match no nn.Linear {where}")
    if any(name == "" for name, _ in chosen):
        raise ValueError("the model is itself an nn.Linear: layers are swapped inside a model; "
                         "use FusedPrunedLowRankLinear.from_linear(model, rank) for a single layer")
    by_weight = {}  # the modules (any kind: an embedding tied to an output layer) holding each weight
    for name, p in model.named_parameters(remove_duplicate=False):
        by_weight.setdefault(id(p), []).append(name.rpartition(".")[0])
    shared = sorted({", ".join(by_weight[id(m.weight)]) for _, m in chosen if len(by_weight[id(m.weight)]) > 1})
    if shared:  # one student per name would untie them
        raise ValueError(f"these modules share one weight (one layer reached twice, or tied "
                         f"weights), which separate low-rank layers would untie: {shared}; leave them "
                         f"out of targets")
    reading = [name for name, _ in chosen
               if _reads_weight(type(model.get_submodule(name.rpartition(".")[0])), name.rpartition(".")[2])]
    if reading:
        raise ValueError(f"the modules holding {reading[:4]}{' ...' if len(reading) > 4 else ''} read "
                         f"their weight in their own forward (as timm's BEiT and EVA attention do with "
                         f"qkv), and a low-rank layer has no dense weight: leave them out of targets")
    return chosen


def prepare(
    model: nn.Module,
    rank: Optional[int] = None,
    *,
    rank_ratio: Optional[float] = None,
    param_ratio: Optional[float] = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    include_head: bool = False,
    init: str = "whiten",
    calib_batches: Optional[Iterable] = None,
    calib_max_batches: Optional[int] = None,
    keep_teacher: bool = True,
    backend: str = "auto",
    rank_multiple: int = 1,
) -> SurgeryReport:
    """The first step of TuneComp: collect input statistics of the target layers on
    ``calib_batches`` (for the activation-aware inits) and swap the layers for low-rank ones
    with the teacher attached. Returns ``replace_linear_layers``' report."""
    rank_for(8, 8, rank, rank_ratio, param_ratio, rank_multiple)  # bad rank arguments fail before calibration
    calib = None
    check_init(init)  # before the calibration it would otherwise ask for
    if init != "svd":
        if calib_batches is None:
            raise ValueError(f"init={init!r} needs calib_batches (input batches of the model)")
        names = [name for name, _ in select_linear_layers(model, targets, include_head)]
        calib = collect_stats(model, calib_batches, names, max_batches=calib_max_batches)
    return replace_linear_layers(
        model, rank, rank_ratio=rank_ratio, param_ratio=param_ratio, targets=targets,
        include_head=include_head, init=init, calib=calib, keep_teacher=keep_teacher,
        backend=backend, rank_multiple=rank_multiple,
    )


def replace_linear_layers(
    model: nn.Module,
    rank: Optional[int] = None,
    *,
    rank_ratio: Optional[float] = None,
    param_ratio: Optional[float] = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    include_head: bool = False,
    init: str = "svd",
    calib: Optional[dict] = None,
    keep_teacher: bool = True,
    backend: str = "auto",
    rank_multiple: int = 1,
) -> SurgeryReport:
    """Swap, in place, every ``nn.Linear`` whose name matches one of ``targets`` for a
    ``FusedPrunedLowRankLinear.from_linear(...)``; the rank comes from exactly one of
    ``rank``, ``rank_ratio``, ``param_ratio`` (see ``rank_for``, also for ``rank_multiple``).
    ``init`` and ``calib``
    (``{name: CalibStats}`` from ``tunecomp.decompose.collect_stats``, for the
    activation-aware inits) are passed on to ``from_linear``. Returns a report.

    Raises ``ValueError`` when no linear layer matches, listing the ones that exist. Warns
    when a layer's factors come out larger than its dense weight (a rank at or above
    ``in·out / (in + out)``, e.g. from capping at full rank or rounding up to ``rank_multiple``).
    """
    rank_for(8, 8, rank, rank_ratio, param_ratio, rank_multiple)  # check the rank arguments before any work
    chosen = select_linear_layers(model, targets, include_head)
    if calib is not None:
        missing = [name for name, _ in chosen if name not in calib]
        if missing:
            raise ValueError(f"calib has no statistics for {missing[:4]}; collect them for every target")
    report, built = SurgeryReport(), []
    for name, linear in chosen:  # every layer built before any is swapped: an error changes nothing
        r = rank_for(linear.in_features, linear.out_features, rank, rank_ratio, param_ratio,
                     rank_multiple)
        layer = FusedPrunedLowRankLinear.from_linear(
            linear, r, init=init, calib=None if calib is None else calib[name],
            keep_teacher=keep_teacher, backend=backend,
        )
        layer.train(linear.training)
        built.append((name, layer))
        bias = 0 if linear.bias is None else linear.bias.numel()
        # (a new layer keeps every entry; counted from the shapes, as on the meta device)
        report.layers.append(ReplacedLayer(name, linear.in_features, linear.out_features, r,
                                           linear.weight.numel() + bias,
                                           r * (linear.in_features + linear.out_features) + bias))
    for name, layer in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    grown = [f"{x.name} (rank {x.rank}: {x.params_before:,} -> {x.params_after:,})"
             for x in report.layers if x.params_after > x.params_before]
    if grown:
        warnings.warn(f"{len(grown)} of {len(report.layers)} layers got factors larger than their dense "
                      f"weight, which compresses nothing: {', '.join(grown[:4])}{' ...' if len(grown) > 4 else ''}; "
                      f"give a lower rank, rank_ratio or param_ratio (or a smaller rank_multiple)", stacklevel=2)
    return report
