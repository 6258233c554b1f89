"""Export a trained model to a compact file, and load it back for inference.

``export(model, path)`` writes a directory:

    model.safetensors   every tensor (never pickle)
    manifest.json       format version, tunecomp/torch versions, the architecture to rebuild
                        (timm name + kwargs), each low-rank layer's form, shapes, storage,
                        every tensor's shape and dtype, the SHA-256 of model.safetensors, and
                        manifest_sha256, that of its own other fields

For each ``FusedPrunedLowRankLinear`` (a teacher still attached is dropped; it must no longer
count: alpha = 0) the masks are folded into the factors, rank components that are entirely
pruned are removed, and one form is chosen:

- ``"lowrank"``: ``LowRankLinear``, ``y = (x·V)·Uᵀ + b`` through ``tunecomp.ops`` (the fused
  kernels where available), when it moves fewer bytes and FLOPs than the dense weight, i.e.
  ``r·(in + out) < in·out``;
- ``"sparse"``: when fewer than ``ops``' CPU threshold (25%) of the factor entries are kept.
  Loaded on the CPU in float32 (backend "auto" or "cpu") it is a ``SparseLowRankLinear``:
  the kept entries alone (values and int32 indices, grouped for the C++ kernel), whose
  forward touches nothing else; loaded anywhere else, the factors' form by the rule of the
  other forms (``LowRankLinear``, zeros included, or the merged ``nn.Linear``). It takes no
  gradient for its input, where the others do;
- ``"semi24"``: ``SemiStructuredLowRankLinear``, for factors that are 2:4 sparse along their
  reduction dims (pruned in ``"n:m"`` mode with n=2, m=4: V along ``in``, U along the rank),
  only when asked for (``form``/``forms``) or timed fastest (``measure=True``): the rule
  gives such factors the form of any other. On an H200 (bf16, ViT-B/16 at 50% of the
  parameters, benchmarks/results/model-nvidia-h200-2026-11-26.md) the model in this form
  ran 6-8x slower than the same factors in the low-rank form at batch 1, 8 and 64: about
  0.6 ms more per sparse product at batch 1, which fits torch's cuSPARSELt path building and
  destroying its matmul plan on every call (host time, ~0.46 ms a call in an upstream report
  that proposes caching the plan, pytorch/pytorch#177866; whether a given torch has such a
  cache is not checked here). Host time is not all of it: replayed from a CUDA graph, with
  no host work per call, the 2:4 model still took 2.6x (batch 1) and 3.5x (batch 64) the
  time of the same factors in low-rank form (H200, 2026-11-27,
  benchmarks/results/model-nvidia-h200-2026-11-27.md). In fp16/bf16 on a CUDA GPU the
  factors run on the sparse tensor cores through ``torch.sparse``'s semi-structured tensors: cuSPARSELt where
  torch has it (sm_80 and newer), else CUTLASS on sm_8x only. In memory the rank is padded
  with zero components to that backend's minimum (16 for cuSPARSELt, 64 for CUTLASS); a
  layer whose feature sizes the backend cannot take, and every layer elsewhere, runs as the
  plain low-rank form (``load`` warns saying why). Dead rank components are kept (removing
  them would break U's groups of 4 along the rank);
- ``"dense"``: the merged ``nn.Linear`` otherwise (and for a layer whose rank fell to 0).

How a layer is stored is separate from its form, so that the file stays near the bytes its
kept entries need (``needed_bytes``) whatever the form: each factor as the smallest of the
plain tensor, its kept values with a bitmask, or its kept values with int32 positions (see
``ENCODINGS``); 2:4 factors as 2 values and 4 bits of positions per group of 4; a dense
layer as its weight, or as its factors (merged by ``load``) where those are smaller; a
layer of rank 0 as its bias alone.

With ``measure=True`` the choice is made by timing the forms on the layer's own shape
(``tokens`` rows) on ``device`` in ``dtype`` (the deployment's: default the model's) instead
of by that rule; "semi24" is among the timed forms where it runs sparse.

``load(path, device=..., dtype=...)`` rebuilds the architecture, swaps in the exported forms,
loads the tensors and returns the model in eval mode. A tampered or truncated file, an
edited manifest, a manifest of another format version, a missing tensor, or a manifest field that does not
fit the file or the architecture raises ``DeployError`` naming it. The manifest's
architecture may not name weights or files to read (``check_arch``): loading reads the two
files of the export and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__, ops
from .nn import FusedPrunedLowRankLinear
from .reference import apply_mask

FORMAT_VERSION = 2
FORMS = ("lowrank", "sparse", "dense", "semi24")
TENSORS = "model.safetensors"
MANIFEST = "manifest.json"


class DeployError(ValueError):
    """An exported model that cannot be loaded as it is (the message says why)."""


class LowRankLinear(nn.Module):
    """Inference-only ``y = (x @ v) @ u.T + bias``: no masks, no teacher, no gradients."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.backend = in_features, out_features, rank, backend
        factory = {"device": device, "dtype": dtype}
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory), requires_grad=False)
        self.v = nn.Parameter(torch.empty(in_features, rank, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "torch" or ops.resolve_backend(self.backend, x.device, x.dtype, self.rank) == "torch":
            # The "torch" backend's math written out, without ops' argument checks, custom-op
            # dispatch or the backend's mask handling: host time is what batch 1 waits on, per
            # low-rank layer of the model (tiny shapes, no_grad, 2-core CPU, paired in one
            # process: 13.3 us a call, against 14.5 through _TorchBackend.forward and ~29
            # through ops; nn.Linear 8.7).
            return F.linear(x @ self.v, self.u, self.bias)
        return ops.masked_lowrank_linear(x, self.u, self.v, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def save_tensors(tensors: dict, path: str) -> None:
    """``safetensors.torch.save_file``, then the file's mode set as for any file this process
    creates (safetensors writes it owner-only, 0600: unreadable to another user or a
    container's)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path)
    except SafetensorError as error:  # a full disk, say: an OSError, as a failed write is
        raise OSError(f"cannot write {path}: {error}") from error
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: str, obj, indent: int = 2) -> None:
    """``obj`` as JSON in ``path``, through a temporary file and an atomic rename: a crash
    leaves the old file or the new one, never part of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # (a failed dump)
            os.remove(tmp)


def sparse_runs_packed(device, dtype: torch.dtype) -> bool:
    """Whether the "sparse" form runs from its kept entries alone (``SparseLowRankLinear`` on
    the CPU kernel) on ``device`` in ``dtype``."""
    return ops._CpuBackend.unavailable_reason(torch.device(device), dtype) is None


class SparseLowRankLinear(nn.Module):
    """Inference-only ``y = (x·V)·Uᵀ + b`` that holds its factors' kept entries alone,
    grouped as the CPU kernel's sparse forward reads them (``ops.pack_kept``): V's by rank
    component, U's by output row; no dense factors, no masks. On the CPU in float32 the
    forward touches kept entries only (``ops.packed_lowrank_linear``; an x in another dtype,
    e.g. bf16 under CPU autocast, is computed in float32 and the result cast back). Its work
    is (kept entries) x tokens whatever the density: above ~25% kept the plain low-rank form
    is faster (ViT-B fc1, 1576 tokens, 60% kept: 22.1 against 13.4 ms), so export's rule
    only picks it below that. Anywhere else (after ``.to()``) it scatters its entries back
    into dense factors on every call: right, not fast; ``load`` on that device builds a
    ``LowRankLinear`` instead."""

    PACKED = ("v_start", "v_index", "v_value", "u_start", "u_index", "u_value")

    def __init__(self, in_features: int, out_features: int, rank: int, kept_v: int, kept_u: int,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1; got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        for name, size, kind in (("v_start", rank + 1, torch.int64), ("v_index", kept_v, torch.int32),
                                 ("v_value", kept_v, dtype), ("u_start", out_features + 1, torch.int64),
                                 ("u_index", kept_u, torch.int32), ("u_value", kept_u, dtype)):
            self.register_buffer(name, torch.zeros(size, device=device, dtype=kind))
        self.bias = (nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)

    @classmethod
    @torch.no_grad()
    def from_factors(cls, u: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> "SparseLowRankLinear":
        """The layer of the nonzero entries of ``u [out, r]`` and ``v [in, r]`` (float32, CPU)."""
        packed = ops.pack_kept(u, v)
        layer = cls(v.shape[0], u.shape[0], u.shape[1], packed[1].numel(), packed[4].numel(),
                    bias is not None, dtype=u.dtype)
        for name, t in zip(cls.PACKED, packed):
            setattr(layer, name, t)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def packed(self) -> ops.PackedFactors:
        return ops.PackedFactors([getattr(self, name) for name in self.PACKED], self.in_features)

    def factors(self) -> tuple:
        """``(u, v)``: the dense factors, zeros where entries were pruned."""
        def scatter(start, index, value, shape, by_row):
            group = torch.repeat_interleave(torch.arange(start.numel() - 1, device=start.device), start.diff())
            where = (group, index.long()) if by_row else (index.long(), group)
            return value.new_zeros(shape).index_put_(where, value)

        return (scatter(self.u_start, self.u_index, self.u_value, (self.out_features, self.rank), True),
                scatter(self.v_start, self.v_index, self.v_value, (self.in_features, self.rank), False))

    def forward(self, x: Tensor) -> Tensor:
        if sparse_runs_packed(self.u_value.device, self.u_value.dtype) and x.device.type == "cpu":
            # in float32 whatever x is (bf16 under CPU autocast), the result in x's dtype
            return ops.packed_lowrank_linear(x.float(), self.packed(), self.bias).to(x.dtype)
        u, v = self.factors()
        return ops.masked_lowrank_linear(x, u, v, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"kept={self.u_index.numel() + self.v_index.numel()}/{self.rank * (self.in_features + self.out_features)}, "
                f"bias={self.bias is not None}")


def semi_structured_unavailable(device, dtype: torch.dtype) -> Optional[str]:
    """None if 2:4 semi-structured factors run on the sparse tensor cores here, else why not."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"2:4 sparse tensor cores need a CUDA GPU, not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 sparse factors run in float16/bfloat16 here, not {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "2:4 sparse tensor cores need sm_80 or newer"
    if _semi_structured_class(device) is None:
        return "2:4 needs cuSPARSELt on this GPU (torch's CUTLASS 2:4 kernels run on sm_8x only)"
    return None


def _semi_structured_class(device):
    """torch's 2:4 tensor class that runs on ``device``: cuSPARSELt where torch has it, else
    CUTLASS, whose kernels are built for sm_8x only; None if neither."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return SparseSemiStructuredTensorCUSPARSELT
    if torch.cuda.get_device_capability(device)[0] == 8:
        return SparseSemiStructuredTensorCUTLASS
    return None


class SemiStructuredLowRankLinear(LowRankLinear):
    """``LowRankLinear`` whose factors are 2:4 sparse along their reduction dims (V along
    ``in``, U along the rank). ``sparsify_()`` converts them for the GPU's sparse tensor
    cores where that is possible; until then, and after any ``.to()``, it runs as the plain
    low-rank form (same results)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sparse = None

    @property
    def semi_structured(self) -> bool:
        """Whether the forward runs on the sparse tensor cores."""
        return self._sparse is not None

    @torch.no_grad()
    def sparsify_(self) -> Optional[str]:
        """Convert the factors for the sparse tensor cores; None if done, else why not."""
        self._sparse = None
        reason = semi_structured_unavailable(self.u.device, self.u.dtype)
        if reason is not None:
            return reason
        if not is_2_4(self.u, self.v):
            return "the factors are not 2:4 sparse along their reduction dims"
        cls = _semi_structured_class(self.u.device)
        # Sparse operands: u [out, r] and v_t [r, in]; rows and columns must be multiples of
        # the backend's minimum. The rank is padded with zero components (2:4, and they add
        # nothing); the feature sizes are the model's.
        rows, cols = cls._DTYPE_SHAPE_CONSTRAINTS[self.u.dtype][:2]
        if self.out_features % rows or self.in_features % cols:
            return (f"{cls.__name__} needs out_features a multiple of {rows} and in_features of {cols}; "
                    f"got {self.out_features} and {self.in_features}")
        multiple = math.lcm(rows, cols)
        pad = -self.rank % multiple
        u = F.pad(self.u, (0, pad)).contiguous()
        v_t = F.pad(self.v, (0, pad)).T.contiguous()  # [r, in]: reduces over in, like x @ v
        self._sparse = (cls.from_dense(v_t), cls.from_dense(u))
        return None

    def _apply(self, fn, recurse=True):
        self._sparse = None  # moved or cast: the converted copies no longer match
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if self._sparse is None:
            return super().forward(x)
        v_t, u = self._sparse
        return F.linear(F.linear(x, v_t), u, self.bias)


def _groups_of_4(factor: Tensor, dim: int) -> Tensor:
    """``factor`` with ``dim`` moved last and cut into groups of 4: [rows, dim/4, 4]."""
    moved = factor.movedim(dim, -1)
    return moved.reshape(moved.shape[0], -1, 4)


def is_2_4(u: Tensor, v: Tensor) -> bool:
    """Whether at most 2 of every 4 consecutive entries along each factor's reduction dim
    (V [in, r] along in, U [out, r] along r) are nonzero."""
    for factor, dim in ((v, 0), (u, 1)):
        if factor.shape[dim] % 4 or factor.numel() == 0:
            return False
        if bool(((_groups_of_4(factor, dim) != 0).sum(-1) > 2).any()):
            return False
    return True


def _pack_2_4(factor: Tensor, dim: int) -> tuple:
    """(values [rows, groups, 2], uint8 positions [rows, groups]) of a 2:4 factor: the (up to)
    two nonzero entries of each group of 4 and their positions p0 + 4·p1."""
    groups = _groups_of_4(factor, dim)
    # stable sort puts the nonzero positions first, in order; a group with fewer than two
    # nonzeros stores zeros at the first zero positions
    where = torch.argsort((groups == 0).to(torch.int8), dim=-1, stable=True)[..., :2]
    values = torch.gather(groups, -1, where).contiguous()
    return values, (where[..., 0] + 4 * where[..., 1]).to(torch.uint8).contiguous()


def _unpack_2_4(values: Tensor, positions: Tensor, shape, dim: int) -> Tensor:
    p = positions.long()
    where = torch.stack([p % 4, p // 4], dim=-1)
    groups = values.new_zeros(*values.shape[:-1], 4).scatter_(-1, where, values)
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(dim))
    return groups.reshape(moved_shape).movedim(-1, dim).contiguous()


# How a factor (or a merged weight) is stored; export picks, per tensor, the smallest:
#   "plain"      the tensor itself                                   n·e bytes
#   "bitmask"    KEY.values: its nonzero entries in row-major order,  k·e + n/8 bytes
#                KEY.bitmask: uint8, bit i%8 of byte i//8 set where flat entry i is kept
#   "positions"  KEY.values and KEY.positions: their flat int32 positions   k·(e + 4) bytes
#   "2:4"        the semi24 form's factors: KEY.values24 [rows, groups, 2], the two kept
#                values of each group of 4 along the reduction dim, and KEY.positions24,
#                their positions p0 + 4·p1 as 4 bits, two groups per byte    n·e/2 + n/8 bytes
# (n entries, k of them nonzero, e bytes each.) A bitmask is the cheaper index down to 1/32
# kept, so "positions" only wins below that.
ENCODINGS = ("plain", "bitmask", "positions", "2:4")
_LEAVES = {"plain": ("",), "bitmask": (".values", ".bitmask"), "positions": (".values", ".positions"),
           "2:4": (".values24", ".positions24")}
REDUCTION_DIM = {"u": 1, "v": 0}  # what 2:4 groups run along: U along the rank, V along in


def encoded_bytes(numel: int, kept: int, element_size: int) -> dict:
    """Bytes each encoding but "2:4" stores for a tensor of ``numel`` entries, ``kept`` nonzero."""
    return {"plain": numel * element_size, "bitmask": kept * element_size + -(-numel // 8),
            "positions": kept * (element_size + 4)}


def smallest_encoding(t: Tensor) -> tuple:
    """``(encoding, bytes)`` of the smallest encoding but "2:4" for ``t``."""
    sizes = encoded_bytes(t.numel(), int(torch.count_nonzero(t)), t.element_size())
    best = min(sizes, key=sizes.get)  # ties: the first, "plain"
    return best, sizes[best]


# (in uint8 throughout: a factor's temporaries stay at one byte per entry)
def _bits(support: Tensor) -> Tensor:
    flags = F.pad(support.reshape(-1).to(torch.uint8), (0, -support.numel() % 8)).reshape(-1, 8)
    return (flags << torch.arange(8, dtype=torch.uint8, device=flags.device)).sum(-1, dtype=torch.uint8)


def _unbits(bits: Tensor, numel: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(-1)[:numel]


def _nibbles(codes: Tensor) -> Tensor:
    """4-bit codes (uint8, 0..15), two to a byte: the even-indexed one in the low half."""
    flat = F.pad(codes.reshape(-1), (0, codes.numel() % 2))
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def _unnibbles(packed: Tensor, numel: int) -> Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)[:numel]


def encode(key: str, t: Tensor, encoding: str, dim: int = 0) -> dict:
    """The tensors that store ``t`` under ``encoding`` (``dim``: the 2:4 groups' dim)."""
    if encoding == "plain":
        return {key: t.contiguous()}
    if encoding == "2:4":
        values, codes = _pack_2_4(t, dim)
        return {f"{key}.values24": values, f"{key}.positions24": _nibbles(codes)}
    flat = t.reshape(-1)
    support = flat != 0
    index = _bits(support) if encoding == "bitmask" else support.nonzero().reshape(-1).to(torch.int32)
    return {f"{key}.values": flat[support].contiguous(), f"{key}{_LEAVES[encoding][1]}": index}


def decode(stored: dict, key: str, encoding: str, shape: tuple, dim: int = 0) -> tuple:
    """``(tensor, support)`` from what ``encode`` stored (``support``: where entries were
    kept; None for "plain"). ``DeployError`` where the stored tensors do not fit ``shape``."""
    numel = math.prod(shape)

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DeployError(f"{key} ({encoding}, shape {tuple(shape)}): {what}")

    missing = [key + leaf for leaf in _LEAVES[encoding] if key + leaf not in stored]
    need(not missing, f"the file lacks {missing}")
    values = stored[key + _LEAVES[encoding][0]]
    need(values.is_floating_point(), f"stored as {values.dtype}, not a floating dtype")
    if encoding == "plain":
        need(tuple(values.shape) == tuple(shape), f"stored with shape {tuple(values.shape)}")
        return values, None
    index = stored[key + _LEAVES[encoding][1]]
    if encoding == "2:4":
        moved = list(shape)
        moved.append(moved.pop(dim))
        need(moved[-1] % 4 == 0, "the groups of 4 do not divide the reduction dim")
        groups = math.prod(moved) // 4
        need(tuple(values.shape) == (moved[0], moved[-1] // 4, 2), f"values24 has shape {tuple(values.shape)}")
        need(index.dtype == torch.uint8 and index.shape == ((groups + 1) // 2,),
             f"positions24 has shape {tuple(index.shape)} and dtype {index.dtype}")
        codes = _unnibbles(index, groups)
        need(bool((codes % 4 != codes // 4).all()), "positions24 repeats a position within a group")
        t = _unpack_2_4(values, codes.reshape(values.shape[:-1]), shape, dim)
        return t, t != 0
    need(values.dim() == 1, f"values has shape {tuple(values.shape)}")
    if encoding == "bitmask":
        need(index.dtype == torch.uint8 and index.shape == (-(-numel // 8),),
             f"bitmask has shape {tuple(index.shape)} and dtype {index.dtype}")
        support = _unbits(index, numel)
        need(int(support.sum()) == values.numel(), f"the bitmask marks {int(support.sum())} entries "
                                                   f"for {values.numel()} values")
    else:
        need(index.dtype == torch.int32 and index.shape == values.shape,
             f"positions has shape {tuple(index.shape)} and dtype {index.dtype}")
        positions = index.long()
        need(values.numel() == 0 or (int(positions[0]) >= 0 and int(positions[-1]) < numel
                                     and bool((positions.diff() > 0).all())),
             f"positions are not increasing within [0, {numel})")
        support = torch.zeros(numel, dtype=torch.bool)
        support[positions] = True
    t = values.new_zeros(numel)
    t[support] = values
    return t.reshape(shape), support.reshape(shape)


@torch.no_grad()
def masked_factors(layer: FusedPrunedLowRankLinear) -> tuple:
    """``(u, v)`` with the masks folded in, at full rank."""
    return apply_mask(layer.u, layer.mask_u), apply_mask(layer.v, layer.mask_v)


def drop_dead_components(u: Tensor, v: Tensor) -> tuple:
    """``(u, v)`` without the rank components that are zero on either side."""
    alive = (u != 0).any(0) & (v != 0).any(0)
    return u[:, alive].contiguous(), v[:, alive].contiguous()


def time_forward(module: nn.Module, x: Tensor, repeats: int = 20) -> float:
    """Seconds per ``module(x)`` under inference mode, after 3 warm-up calls: ``repeats``
    calls timed in up to 5 rounds (the device synchronised around each), the median round's
    time per call, so that a burst of load on a shared machine moves one round, not the result."""
    rounds = max(1, min(5, repeats))
    per_round = [repeats // rounds + (i < repeats % rounds) for i in range(rounds)]
    times = []
    with torch.inference_mode():
        for _ in range(3):
            module(x)
        for calls in per_round:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            for _ in range(calls):
                module(x)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _dense(u: Tensor, v: Tensor, bias: Optional[Tensor], in_features: int, out_features: int) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=u.device, dtype=u.dtype)
    with torch.no_grad():
        linear.weight.copy_(u @ v.T)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def _lowrank(u: Tensor, v: Tensor, bias: Optional[Tensor], cls=LowRankLinear) -> LowRankLinear:
    layer = cls(v.shape[0], u.shape[0], u.shape[1], bias is not None, device=u.device, dtype=u.dtype)
    with torch.no_grad():
        layer.u.copy_(u)
        layer.v.copy_(v)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def kept_fraction(u: Tensor, v: Tensor) -> float:
    """The fraction of nonzero entries over both factors."""
    return (int((u != 0).sum()) + int((v != 0).sum())) / max(1, u.numel() + v.numel())


def choose_form(u: Tensor, v: Tensor, bias: Optional[Tensor], measure: bool = False,
                device=None, tokens: int = 1576, kept: Optional[float] = None,
                full: Optional[tuple] = None, dtype: Optional[torch.dtype] = None) -> str:
    """The form for one layer: by the rule in the module doc, or by timing them. ``u``, ``v``:
    the compacted factors; ``full``: the masked factors at full rank when they are 2:4."""
    in_features, out_features, rank = v.shape[0], u.shape[0], u.shape[1]
    if rank == 0:
        return "dense"
    if not measure:
        kept = kept_fraction(u, v) if kept is None else kept
        if kept < ops._CpuBackend.SPARSE_BELOW:
            return "sparse"
        return "lowrank" if rank * (in_features + out_features) < in_features * out_features else "dense"
    device = torch.device(device or u.device)
    dtype = dtype or u.dtype
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    u, v = u.to(device, dtype), v.to(device, dtype)
    bias = None if bias is None else bias.to(device, dtype)
    timings = {"lowrank": time_forward(_lowrank(u, v, bias), x),
               "dense": time_forward(_dense(u, v, bias, in_features, out_features), x)}
    if sparse_runs_packed(device, dtype):  # elsewhere "sparse" loads as "lowrank" or "dense"
        timings["sparse"] = time_forward(SparseLowRankLinear.from_factors(u, v, bias), x)
    if full is not None:
        semi = _lowrank(full[0].to(device, dtype), full[1].to(device, dtype), bias, SemiStructuredLowRankLinear)
        if semi.sparsify_() is None:
            timings["semi24"] = time_forward(semi, x)
    return min(timings, key=timings.get)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# timm kwargs that read files or the network: a manifest naming them is refused, so that
# loading an export never reads more than its own two files.
_UNSAFE_KWARG_WORDS = ("pretrained", "checkpoint", "cache", "url", "hub")
_UNSAFE_KWARG_ENDS = ("path", "dir", "file", "files")  # checkpoint_path, not drop_path_rate
DTYPES = ("float32", "float16", "bfloat16", "float64")


def _check_device_dtype(device, dtype) -> Optional[torch.device]:
    """``device`` as a torch.device (None stays None); ``ValueError`` naming the argument
    where ``device`` is CUDA with none here, or ``dtype`` is not a floating torch.dtype."""
    try:
        device = None if device is None else torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a device such as 'cpu', 'cuda' or 'cuda:1', or None; got {device!r}") from None
    if device is not None and device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device is {device}, but no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device is {device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, ...) or None; "
                         f"got {dtype!r}")
    return device


def check_arch(arch: Optional[str], arch_kwargs: dict) -> None:
    """``DeployError`` unless ``arch``/``arch_kwargs`` build a timm model from nothing but
    themselves (no hub or local-dir names, no checkpoint paths or pretrained weights)."""
    if arch is not None and (not isinstance(arch, str) or ":" in arch or "/" in arch):
        raise DeployError(f"arch must be a plain timm model name (no hub or path prefix); got {arch!r}")
    unsafe = sorted(k for k in arch_kwargs if any(word in k.lower() for word in _UNSAFE_KWARG_WORDS)
                    or k.lower().endswith(_UNSAFE_KWARG_ENDS))
    if unsafe:
        raise DeployError(f"arch_kwargs must not load weights or files; got {unsafe}")


@torch.no_grad()
def export(model: nn.Module, path: str, arch: Optional[str] = None, arch_kwargs: Optional[dict] = None,
           forms: Optional[dict] = None, measure: bool = False, device=None, tokens: int = 1576,
           form: Optional[str] = None, dtype: Optional[torch.dtype] = None, progress: bool = False,
           overwrite: bool = False) -> dict:
    """Write ``model`` (with trained ``FusedPrunedLowRankLinear`` layers) to the directory
    ``path``; returns the manifest. ``arch``/``arch_kwargs``: the timm name and kwargs to
    rebuild it (default: the model's own ``pretrained_cfg['architecture']``, no kwargs);
    without them, ``load`` needs the caller's skeleton model. ``forms``: ``{layer name:
    form}`` to force a form (``form``: the same for every layer that ``forms`` does not name).
    ``measure``/``device``/``tokens``/``dtype``: choose forms by timing (``dtype``: the one
    the model will be loaded in; the file keeps the model's own). ``progress``: a progress
    bar over the layers (on stderr). ``overwrite``: replace an export already in ``path``
    (else ``FileExistsError``).

    ``arch``/``arch_kwargs`` are checked against the model: the model timm builds from them
    must have the model's tensors, with their shapes (kwargs that change no shape, such as
    ``act_layer``, cannot be told apart: pass the ones the model was built with)."""
    forms = dict(forms or {})
    arch_kwargs = dict(arch_kwargs or {})
    if form is not None and form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    unknown = {n: f for n, f in forms.items() if f not in FORMS}
    if unknown:
        raise ValueError(f"forms must be one of {FORMS}; got {unknown}")
    device = _check_device_dtype(device, dtype)
    if measure:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens must be a positive int (the token count to time forms at); got {tokens!r}")
    if arch is None:
        arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    check_arch(arch, arch_kwargs)
    try:  # checked before anything is written: the manifest holds them as JSON
        json.dumps(arch_kwargs, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"arch_kwargs must be JSON values (numbers, strings, lists, dicts); got "
                         f"{arch_kwargs!r} ({error})") from None
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedPrunedLowRankLinear)}
    if "" in layers:
        raise ValueError("model is itself a FusedPrunedLowRankLinear; export the model that holds such layers")
    if set(forms) - set(layers):
        raise ValueError(f"forms names layers that are not low-rank layers of the model: {sorted(set(forms) - set(layers))}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"path {path} is a file; export writes a directory")
    existing = [f for f in (TENSORS, MANIFEST) if os.path.exists(os.path.join(path, f))]
    if existing and not overwrite:
        raise FileExistsError(f"{path} already holds {' and '.join(existing)}: pass overwrite=True "
                              f"(tunecomp export --overwrite) to replace them, or choose another directory")
    blending = [f"{name} (alpha={m.alpha:g})" for name, m in layers.items() if m.has_teacher and m.alpha > 0]
    if blending:
        raise ValueError(f"export needs the student alone; the teacher still counts in {blending[:3]}: "
                         f"finish training (alpha = 0) or call drop_teacher()")
    if arch is not None:
        _check_arch_fits(model, layers, arch, arch_kwargs)
    model_dtype = next((t.dtype for t in model.state_dict().values() if t.is_floating_point()), torch.float32)
    state, layer_info = {}, {}
    todo = layers.items()
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, total=len(layers), desc="export", unit="layer")
    for name, layer in todo:
        full = masked_factors(layer)
        u, v = drop_dead_components(*full)
        full = full if is_2_4(*full) else None  # kept at full rank for the 2:4 form
        bias = None if layer.bias is None else layer.bias.detach()
        kept = kept_fraction(u, v)
        chosen = forms.pop(name, None) or form or choose_form(u, v, bias, measure, device, tokens, kept, full, dtype)
        if u.shape[1] == 0:  # everything pruned: the layer is its bias
            chosen = "dense"
        if chosen == "semi24" and full is None:
            raise ValueError(f"layer {name} cannot take form 'semi24': its factors are not 2:4 sparse "
                             f"along their reduction dims (prune with mode='n:m', n=2, m=4)")
        if chosen == "semi24":
            stored, storage = {"u": full[0], "v": full[1]}, {"u": "2:4", "v": "2:4"}
        elif u.shape[1] == 0:
            stored, storage = {}, {}  # a zero weight: nothing to store
        else:
            stored = {"u": u, "v": v}
            smallest = {side: smallest_encoding(t) for side, t in stored.items()}
            storage = {side: encoding for side, (encoding, _) in smallest.items()}
            factor_bytes = sum(size for _, size in smallest.values())
            if chosen == "dense" and layer.in_features * layer.out_features * u.element_size() <= factor_bytes:
                stored, storage = {"weight": u @ v.T}, {"weight": "plain"}  # else merged by load
        for side, encoding in storage.items():
            state.update(encode(f"{name}.{side}", stored[side], encoding, REDUCTION_DIM.get(side, 0)))
        if bias is not None:
            state[f"{name}.bias"] = bias.contiguous()
        layer_info[name] = {"form": chosen, "in_features": layer.in_features, "out_features": layer.out_features,
                            "rank": int(stored["u"].shape[1]) if "u" in stored else int(u.shape[1]),
                            "rank_before": layer.rank, "bias": bias is not None, "kept": kept,
                            "storage": storage, "dtype": str(layer.u.dtype).replace("torch.", "")}
    prefixes = tuple(f"{name}." for name in layers)
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefixes):
            state[key] = tensor.detach().contiguous()
    os.makedirs(path, exist_ok=True)
    tensors_path = os.path.join(path, TENSORS)
    # Both files written aside first, then the old manifest removed before the new tensors
    # take its place: a crash leaves the old export, or no manifest (never a manifest that
    # describes other tensors than the file's).
    tmp = f"{tensors_path}.tmp{os.getpid()}"
    try:
        save_tensors({k: t.cpu() for k, t in state.items()}, tmp)
        manifest = _manifest(arch, arch_kwargs, model_dtype, layer_info, state, tmp)
        if os.path.exists(os.path.join(path, MANIFEST)):
            os.remove(os.path.join(path, MANIFEST))
        os.replace(tmp, tensors_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    write_json(os.path.join(path, MANIFEST), manifest, indent=1)
    return manifest


def _manifest(arch, arch_kwargs, model_dtype, layer_info, state, tensors_path) -> dict:
    manifest = {
        "format_version": FORMAT_VERSION, "tunecomp": __version__, "torch": torch.__version__,
        "arch": arch, "arch_kwargs": arch_kwargs,
        "dtype": str(model_dtype).replace("torch.", ""), "layers": layer_info,
        "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for k, t in state.items()},
        "sha256": _sha256(tensors_path), "bytes": os.path.getsize(tensors_path),
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return manifest


def _check_arch_fits(model: nn.Module, layers: dict, arch: str, arch_kwargs: dict) -> None:
    """``ValueError`` naming ``arch_kwargs`` unless timm's ``arch`` with them has the model's
    tensors with their shapes, the low-rank layers as Linear layers of their sizes."""
    want = {k: tuple(t.shape) for k, t in build_skeleton(arch, arch_kwargs, "arch").state_dict().items()}
    have = {}
    prefixes = tuple(f"{name}." for name in layers)
    for key, t in model.state_dict().items():
        if not key.startswith(prefixes):
            have[key] = tuple(t.shape)
    for name, layer in layers.items():
        have[f"{name}.weight"] = (layer.out_features, layer.in_features)
        if layer.bias is not None:
            have[f"{name}.bias"] = (layer.out_features,)
    differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if differ:
        shown = "; ".join(f"{k}: model {have.get(k, 'none')}, arch {want.get(k, 'none')}" for k in differ[:3])
        raise ValueError(f"arch {arch!r} with arch_kwargs {arch_kwargs} does not build this model "
                         f"({len(differ)} tensors differ: {shown}): pass the kwargs the model was built with")


def build_skeleton(arch: str, arch_kwargs: dict, what: str) -> nn.Module:
    """timm's ``arch`` with ``arch_kwargs``, no weights: built on the meta device (nothing
    allocated; ``load`` fills it with the file's tensors through load_state_dict's assign),
    except where timm cannot build it there or it has buffers its state does not hold
    (computed at construction): then on the CPU. ``DeployError`` naming ``what`` where timm
    cannot build it at all."""
    import timm

    def build():
        try:
            return timm.create_model(arch, pretrained=False, **arch_kwargs)
        except Exception as error:  # noqa: BLE001 - timm raises all kinds for kwargs it cannot take
            raise DeployError(f"timm cannot build {what} {arch!r} with arch_kwargs {arch_kwargs}: {error}") from None

    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # noqa: BLE001 - some timm versions compute on tensors in constructors (.item())
        model = None
    if model is None or {name for name, _ in model.named_buffers()} - set(model.state_dict()):
        model = build()
    return model


def needed_bytes(model: nn.Module) -> int:
    """The bytes a model's kept entries need, the yardstick of an export's size: every
    tensor of its state in full, except the factors of ``FusedPrunedLowRankLinear`` layers
    (teacher and masks not counted): their kept entries, plus, for a factor with pruned
    entries, the cheaper of a bitmask (1 bit per entry) and 4-byte positions per kept entry."""
    total = 0
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FusedPrunedLowRankLinear)}
    for name, layer in layers.items():
        for factor in drop_dead_components(*masked_factors(layer)):
            kept = int(torch.count_nonzero(factor))
            total += kept * factor.element_size() + (0 if kept == factor.numel() else min(-(-factor.numel() // 8), 4 * kept))
        if layer.bias is not None:
            total += layer.bias.numel() * layer.bias.element_size()
    prefixes = tuple(f"{name}." for name in layers)
    return total + sum(t.numel() * t.element_size() for key, t in model.state_dict().items() if not key.startswith(prefixes))


def read_manifest(path: str) -> dict:
    """The manifest of the export in ``path``, its fields checked (``DeployError`` naming the
    first that is missing or wrong)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise DeployError(f"{path} holds no {MANIFEST}: not a tunecomp export (or one interrupted while written)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit int
        raise DeployError(f"{manifest_path} is not valid JSON ({type(error).__name__}: {error}): "
                          f"truncated or edited?") from None
    if not isinstance(manifest, dict):
        raise DeployError(f"{manifest_path} holds a {type(manifest).__name__}, not a manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DeployError(f"{manifest_path} has format_version {version!r}; this tunecomp "
                          f"({__version__}) reads version {FORMAT_VERSION}")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DeployError(f"{manifest_path}: {what}")

    def is_int(x, low: int = 0) -> bool:
        return type(x) is int and x >= low

    for key, kind in (("arch", (str, type(None))), ("arch_kwargs", dict), ("dtype", str), ("layers", dict),
                      ("tensors", dict), ("sha256", str), ("bytes", int), ("manifest_sha256", str)):
        need(key in manifest, f"no {key!r}")
        need(isinstance(manifest[key], kind), f"{key!r} is a {type(manifest[key]).__name__}")
    need(manifest["dtype"] in DTYPES, f"'dtype' is {manifest['dtype']!r}, not one of {DTYPES}")
    check_arch(manifest["arch"], manifest["arch_kwargs"])
    for key, info in manifest["tensors"].items():
        need(isinstance(info, dict) and isinstance(info.get("shape"), list) and all(is_int(n) for n in info["shape"])
             and isinstance(info.get("dtype"), str), f"tensor {key!r} has no valid shape and dtype: {info!r}")
    for name, info in manifest["layers"].items():
        need(isinstance(info, dict), f"layer {name!r} is a {type(info).__name__}")
        for key, ok in (("form", info.get("form") in FORMS), ("in_features", is_int(info.get("in_features"), 1)),
                        ("out_features", is_int(info.get("out_features"), 1)), ("rank", is_int(info.get("rank"))),
                        ("bias", isinstance(info.get("bias"), bool)), ("storage", isinstance(info.get("storage"), dict))):
            need(ok, f"layer {name!r} has {key} {info.get(key)!r}" + (f" (forms: {FORMS})" if key == "form" else ""))
        need(info["rank"] <= min(info["in_features"], info["out_features"]),
             f"layer {name!r} has rank {info['rank']}, above min(in_features, out_features)")
        storage, form = info["storage"], info["form"]
        if form == "semi24":
            ok = storage == {"u": "2:4", "v": "2:4"}
        elif form == "dense" and "weight" in storage:
            ok = storage == {"weight": "plain"}
        else:
            ok = (set(storage) == {"u", "v"} and set(storage.values()) <= {"plain", "bitmask", "positions"}) or (
                storage == {} and form == "dense" and info["rank"] == 0)
        need(ok, f"layer {name!r} (form {form!r}, rank {info['rank']}) has storage {storage!r}")
    return manifest


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's fields but ``manifest_sha256`` itself, as canonical JSON."""
    fields = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(path: str, manifest: dict) -> None:
    """The export is as written: the manifest unedited (its ``manifest_sha256``), the tensors
    file there, whole and unmodified (its size and SHA-256 are the manifest's); ``DeployError``
    saying which is not. Checksums against damage and stray edits, not a signature: whoever
    edits a file on purpose can recompute them."""
    if manifest["manifest_sha256"] != manifest_digest(manifest):
        raise DeployError(f"{os.path.join(path, MANIFEST)} was edited after export: its fields no longer match "
                          f"its manifest_sha256 (an edit that keeps the shapes, say act_layer, would change "
                          f"what the model computes)")
    tensors_path = os.path.join(path, TENSORS)
    if not os.path.isfile(tensors_path):
        raise DeployError(f"{path} has no {TENSORS}")
    size = os.path.getsize(tensors_path)
    if size != manifest["bytes"]:
        raise DeployError(f"{tensors_path} has {size} bytes, the manifest says {manifest['bytes']}: truncated or replaced")
    if _sha256(tensors_path) != manifest["sha256"]:
        raise DeployError(f"{tensors_path} does not match the manifest's SHA-256: the file was modified")


# Rank padding of the low-rank layers where ``load`` puts them on a GPU: the factors' rows
# (and a mask's) are then a multiple of 16 elements long. Triton specializes a kernel on
# strides divisible by 16 and only then copies tiles asynchronously; with rank 307 (ViT-B/16's
# MLP at half the parameters) every factor load of the forward kernel stayed synchronous in
# the sm_90 TTGIR (benchmarks/kernel_resources.py). NVIDIA recommends leading dimensions that
# are multiples of 8 for 16-bit tensor-core GEMMs (cuBLAS). The padding is zero components:
# at most 15 more rank columns, the same outputs.
GPU_RANK_MULTIPLE = 16


def _pad_rank(factor: Tensor, rank: int) -> Tensor:
    """``factor`` [rows, r] with zero columns appended up to ``rank``."""
    return F.pad(factor, (0, rank - factor.shape[1])) if rank > factor.shape[1] else factor


def load(path: str, device=None, dtype: Optional[torch.dtype] = None, model: Optional[nn.Module] = None,
         backend: str = "auto", rank_multiple: Optional[int] = None) -> nn.Module:
    """The exported model, ready for inference (eval mode, no gradients), on ``device``
    (default: where ``model``, the skeleton to load into, lives; else the CPU) in ``dtype``
    (default: the dtype it was exported in).

    ``rank_multiple``: the low-rank layers' ranks are padded with zero components up to a
    multiple of it (default ``GPU_RANK_MULTIPLE`` = 16 where the model goes to a CUDA device,
    else 1: no padding). Same outputs; aligned factor rows for the GPU kernels."""
    from safetensors.torch import load_file

    device = _check_device_dtype(device, dtype)
    if rank_multiple is not None and (isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int)
                                      or rank_multiple < 1):
        raise ValueError(f"rank_multiple must be a positive int or None; got {rank_multiple!r}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}; got {backend!r}")
    manifest = read_manifest(path)
    dtype = dtype or getattr(torch, manifest["dtype"])
    verify(path, manifest)
    tensors_path = os.path.join(path, TENSORS)
    state = load_file(tensors_path)
    missing = [k for k in manifest["tensors"] if k not in state]
    if missing:
        raise DeployError(f"{tensors_path} lacks tensors the manifest lists: {missing[:4]}")
    unlisted = [k for k in state if k not in manifest["tensors"]]
    if unlisted:
        raise DeployError(f"{tensors_path} holds tensors the manifest does not list: {unlisted[:4]}")
    for key, info in manifest["tensors"].items():
        found = (list(state[key].shape), str(state[key].dtype).replace("torch.", ""))
        if found != (info["shape"], info["dtype"]):
            raise DeployError(f"tensor {key} has shape {found[0]} and dtype {found[1]} in {TENSORS}; "
                              f"the manifest says {info['shape']} and {info['dtype']}")
    if model is None:
        if not manifest["arch"]:
            raise DeployError("the manifest names no architecture: pass model= (the skeleton to load into)")
        model = build_skeleton(manifest["arch"], manifest["arch_kwargs"], "the manifest's arch")
    if device is None:  # a skeleton given on a device keeps the swapped-in layers there too
        device = next((t.device for t in model.state_dict().values() if not t.is_meta), None)
    packed_here = backend in ("auto", "cpu") and sparse_runs_packed(device or "cpu", dtype)
    if rank_multiple is None:
        rank_multiple = GPU_RANK_MULTIPLE if device is not None and device.type == "cuda" else 1
    for name, info in manifest["layers"].items():
        shape = (info["in_features"], info["out_features"])
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear) or (target.in_features, target.out_features) != shape:
            found = ("no such submodule" if target is None else
                     f"Linear {target.in_features} -> {target.out_features}" if isinstance(target, nn.Linear)
                     else type(target).__name__)
            raise DeployError(f"manifest layer {name!r} (Linear {shape[0]} -> {shape[1]}) is not a layer "
                              f"of that shape in the model; found {found}")
        bias = state.get(f"{name}.bias")
        if (bias is not None) != info["bias"] or (bias is not None and list(bias.shape) != [shape[1]]):
            raise DeployError(f"manifest layer {name!r} has bias {info['bias']} and out_features {shape[1]}, but "
                              f"{TENSORS} holds {'no bias' if bias is None else f'a bias of shape {list(bias.shape)}'} "
                              f"for it")
        parent_name, _, child = name.rpartition(".")
        form = info["form"]
        if form == "sparse" and not packed_here:  # the factors' form by the rule of choose_form
            form = "lowrank" if info["rank"] * sum(shape) < shape[0] * shape[1] else "dense"
        rows = {"u": info["out_features"], "v": info["in_features"], "weight": info["out_features"]}
        decoded = {side: decode(state, f"{name}.{side}", encoding,
                                (rows[side], info["in_features"] if side == "weight" else info["rank"]),
                                REDUCTION_DIM.get(side, 0))
                   for side, encoding in info["storage"].items()}
        for side, encoding in info["storage"].items():
            for leaf in _LEAVES[encoding]:
                del state[f"{name}.{side}{leaf}"]
        if form == "dense":
            with torch.device("meta"):  # filled by load_state_dict(assign=True) below
                module = nn.Linear(*shape, bias=info["bias"])
            if "weight" in decoded:
                weight = decoded["weight"][0]
            elif decoded:  # the factors were the smaller file: merged here
                u, v = decoded["u"][0], decoded["v"][0]
                compute = torch.promote_types(torch.promote_types(u.dtype, dtype), torch.float32)
                weight = (u.to(compute) @ v.to(compute).T).to(dtype)  # rounded once, to the load dtype
            else:  # rank 0: the layer is its bias
                weight = torch.zeros(info["out_features"], info["in_features"], dtype=getattr(torch, manifest["dtype"]))
            state[f"{name}.weight"] = weight
        elif form == "sparse":
            # packed from this layer's factors alone: the dense ones are gone after this line
            module = SparseLowRankLinear.from_factors(decoded["u"][0].float(), decoded["v"][0].float(),
                                                      state.get(f"{name}.bias"))
            state.update({f"{name}.{key}": t for key, t in module.named_buffers()})
        else:
            cls = {"lowrank": LowRankLinear, "semi24": SemiStructuredLowRankLinear}[form]
            rank = info["rank"]
            if cls is LowRankLinear:  # the 2:4 form keeps its packed layout
                rank = -(-rank // rank_multiple) * rank_multiple
            with torch.device("meta"):  # filled by load_state_dict(assign=True) below
                module = cls(*shape, rank, bias=info["bias"], backend=backend)
            for side, (factor, _) in decoded.items():
                state[f"{name}.{side}"] = _pad_rank(factor, rank)
        setattr(model.get_submodule(parent_name), child, module)
    try:
        # assigned, not copied: a copy into the skeleton would round through its dtype first
        model.load_state_dict({key: t.contiguous() for key, t in state.items()}, strict=True, assign=True)
    except RuntimeError as error:
        raise DeployError(f"the tensors do not fit the architecture: {error}") from None
    model.requires_grad_(False)
    model = model.to(device=device, dtype=dtype).eval()
    semi = [m for m in model.modules() if isinstance(m, SemiStructuredLowRankLinear)]
    reasons = {m.sparsify_() for m in semi} - {None}
    if reasons:
        warnings.warn(f"{sum(not m.semi_structured for m in semi)} of {len(semi)} layers in 2:4 form "
                      f"run as dense low-rank here: {'; '.join(sorted(reasons))}", stacklevel=2)
    return model
