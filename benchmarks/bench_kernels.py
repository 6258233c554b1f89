"""Kernel benchmarks: tunecomp's backends against eager PyTorch, torch.compile and nn.Linear.

    python -m pytest benchmarks/ --benchmark-json=bench.json   # TUNECOMP_BENCH_GRID=smoke|gpu|full
    python benchmarks/report.py bench.json                      # -> benchmarks/results/

Every case times one implementation at one point of the grid (DESIGN.md section 5) and
records in ``extra_info`` what ``report.py`` needs: the case, dtype, the byte floor and useful
FLOPs of the point (see ``work``), and ``k``, the number of calls per timed round. On paired
grids (``Grid.paired``) a backend case also times its baselines in rounds alternating with its
own (``measure``).

How a case is timed: CUDA work is asynchronous, so one timed round runs the op ``k`` times
back to back over rotating input buffers and then synchronizes; the per-call time is the
round's time / k. ``k`` is chosen after warm-up so that a round lasts about ``Grid.round_s``
(long enough that one sync and the timer don't matter). Warm-up (Triton autotuning,
torch.compile compilation) happens before any timed round. Host overhead is part of what is
measured: at small token counts it is what separates the implementations.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from pairing import pedantic_paired  # benchmarks/ is on sys.path under pytest (its conftest.py)
from tunecomp import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16 is what the targets are about; the CPU smoke run uses float32 (bf16 matmuls on CPU are
# slow and not what anybody would deploy there).
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
DTYPE_NAME = str(DTYPE).replace("torch.", "")

# tunecomp backends timed through tunecomp.ops. Names that ops.available_backends reports
# unavailable here are skipped and listed in the results. Adding a backend = adding its name.
KERNEL_BACKENDS = ("triton", "cuda")

# What each tunecomp op is compared against (functions below).
BASELINES = {
    "masked": ("eager", "compile", "dense"),
    "blended": ("eager",),
}

VIT_SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768))  # ViT-B/16: qkv, proj, fc1, fc2
VIT_TOKENS = tuple(197 * batch for batch in (1, 8, 64, 256))

# Input buffers rotated through per case: large inputs are then read from HBM, not from the
# 50 MiB L2 of an H100 (small ones still fit, as they would after the previous layer wrote them).
ROTATE_BYTES = 256 << 20


@dataclass(frozen=True)
class Section:
    op: str  # "masked" or "blended"
    direction: str  # "fwd" or "fwd+bwd"
    shapes: tuple  # (in_features, out_features) pairs
    tokens: tuple
    ranks_rhos: tuple  # (rank, rho) pairs; rho = fraction of factor entries pruned
    backends: tuple = ()  # tunecomp backends timed here besides the grid's


@dataclass(frozen=True)
class Grid:
    sections: tuple
    backends: tuple  # tunecomp backends to time
    copy_bytes: int  # size of the device-to-device copy ceiling
    matmul_size: int  # n of the n x n x n matmul ceiling
    rounds: int
    round_s: float  # target duration of one timed round
    max_k: int
    baselines: tuple = ()  # (op, names) pairs replacing BASELINES for this grid
    # Also time each baseline inside every backend case, one round of it before each of the
    # backend's rounds, so that the backend's ratios compare rounds taken side by side (a
    # shared machine's load drifts between separately timed cases: on the 2-core CI machine
    # single ratios moved by up to 20% between runs).
    paired: bool = False
    # In fwd+bwd, update the parameters in place before each step (multiplied by 1), as an
    # optimiser step does, so that work redone whenever they change is timed as training pays
    # it: the cpu backend packs the kept entries of changed factors again.
    params_change: bool = False


def _full_sections():
    ranks = (32, 64, 128, 192, 256, 384)
    every = tuple((r, rho) for r in ranks for rho in (0.0, 0.5, 0.9))
    some = tuple((r, 0.5) for r in (64, 192, 384))
    return (
        Section("masked", "fwd", VIT_SHAPES, VIT_TOKENS, every),
        Section("masked", "fwd+bwd", VIT_SHAPES, VIT_TOKENS, some),
        Section("blended", "fwd", VIT_SHAPES, VIT_TOKENS, some),
        Section("blended", "fwd+bwd", VIT_SHAPES, VIT_TOKENS, some),
    )


# Cost model behind the "gpu" grid (H100, estimates, not yet measured): the first call of a
# Triton kernel per autotune key (token bucket, in, out, rank) times its 5-10 configs, ~1-2 s,
# plus compiling each config once per rank padding and input alignment, ~1 s each; the first
# call of torch.compile per shape, ~1.5-3 s; a timed case ~0.1-0.2 s. Sections, in order:
#   1. masked fwd, 4 shapes x 12608 tokens (batch 64) x rank 192, rho 0.5: 4 points, 4
#      autotune keys, 4 compiled shapes                                            ~25 s
#   2. masked fwd+bwd, the same 4 points, the backward's 4 kernels compiled and tuned
#      (5 keys per point)                                                          ~55 s
#   3. blended fwd and fwd+bwd, same 4 points (triton vs eager)                    ~45 s
#   4. masked fwd as 1. at 197, 1576 and 50432 tokens: 12 points                  ~75 s
#   5. masked fwd as 1. and 4. at rho 0 and 0.9: 32 points, nothing new to tune, but the
#      torch.compile baseline (one compiled shape at a time) compiles the 16 again    ~45-70 s
#   6. masked fwd, ranks 64 and 384 at rho 0.5, 4 shapes x 4 token counts: 32 points,
#      two more rank paddings to compile for, 32 keys, 32 compiled shapes           ~115 s
# About 6 min in all. Token counts in fwd+bwd are multiples of 16 only, so the backward
# kernels compile for one alignment. Sections run in this order so that a time budget
# (TUNECOMP_BENCH_BUDGET_S, set by gpu_check.sh: ~105 s) cuts the least important points
# first: every op at one point (batch 64, rank 192, rho 0.5) comes before the other token
# counts, rhos and ranks.
GRIDS = {
    "smoke": Grid(
        sections=(
            Section("masked", "fwd", ((64, 96),), (16, 40), ((8, 0.5), (8, 0.0))),
            Section("masked", "fwd+bwd", ((64, 96),), (40,), ((8, 0.5),)),
            Section("blended", "fwd", ((64, 96),), (40,), ((8, 0.5),)),
            Section("blended", "fwd+bwd", ((64, 96),), (40,), ((8, 0.5),)),
        ),
        backends=("torch",), copy_bytes=32 << 20, matmul_size=256,
        rounds=5, round_s=2e-3, max_k=20, paired=True,
    ),
    "gpu": Grid(
        sections=(
            Section("masked", "fwd", VIT_SHAPES, (12608,), ((192, 0.5),)),
            Section("masked", "fwd+bwd", VIT_SHAPES, (12608,), ((192, 0.5),)),
            # "torch": auto's pick on CUDA, whose blend folds the student into the teacher's
            # weight at these token counts (ops.folding_pays), as the triton forward does
            Section("blended", "fwd", VIT_SHAPES, (12608,), ((192, 0.5),), backends=("torch",)),
            Section("blended", "fwd+bwd", VIT_SHAPES, (12608,), ((192, 0.5),), backends=("torch",)),
            Section("masked", "fwd", VIT_SHAPES, (197, 1576, 50432), ((192, 0.5),)),
            Section("masked", "fwd", VIT_SHAPES, VIT_TOKENS, ((192, 0.0), (192, 0.9))),
            Section("masked", "fwd", VIT_SHAPES, VIT_TOKENS, ((64, 0.5), (384, 0.5))),
        ),
        backends=KERNEL_BACKENDS, copy_bytes=1 << 30, matmul_size=8192,
        rounds=15, round_s=4e-3, max_k=500,
    ),
    # The CPU backend on a CI-class machine (2 cores): ViT-B/16 layers, batch 1 and 8, rank
    # 25% of full, the pruning ratios where its sparse path matters; float32; against the
    # eager reference math and dense nn.Linear (torch.compile on CPU is left out: minutes of
    # compiling per shape on 2 cores).
    "cpu": Grid(
        sections=(Section("masked", "fwd", VIT_SHAPES, (197, 1576),
                          tuple((192, rho) for rho in (0.0, 0.5, 0.9, 0.95))),
                  # training once alpha is 0: both passes' dense path to 75% pruned, their
                  # sparse path beyond (ops._CpuBackend.SPARSE_BELOW)
                  Section("masked", "fwd+bwd", VIT_SHAPES, (197, 1576),
                          tuple((192, rho) for rho in (0.0, 0.5, 0.9))),
                  # the blend (training while alpha > 0): folded into the teacher's weight
                  # at 1576 tokens, two branches at 197 (ops.folding_pays)
                  Section("blended", "fwd", VIT_SHAPES, (197, 1576), ((192, 0.5),),
                          backends=("torch",)),
                  Section("blended", "fwd+bwd", VIT_SHAPES, (197, 1576), ((192, 0.5),),
                          backends=("torch",))),
        backends=("cpu",), copy_bytes=256 << 20, matmul_size=1024,
        rounds=7, round_s=0.05, max_k=20, baselines=(("masked", ("eager", "dense")),),
        paired=True, params_change=True,
    ),
    # Every rank 32-384 and rho of DESIGN.md section 5: ~40 min on an H100 (not for gpu_check).
    "full": Grid(
        sections=_full_sections(), backends=KERNEL_BACKENDS, copy_bytes=1 << 30,
        matmul_size=8192, rounds=15, round_s=4e-3, max_k=500,
    ),
}

GRID_NAME = os.environ.get("TUNECOMP_BENCH_GRID", "gpu" if DEVICE.type == "cuda" else "smoke")
if GRID_NAME not in GRIDS:
    raise ValueError(f"TUNECOMP_BENCH_GRID must be one of {sorted(GRIDS)}; got {GRID_NAME!r}")
GRID = GRIDS[GRID_NAME]
_requested = os.environ.get("TUNECOMP_BENCH_BACKENDS")
REQUESTED_BACKENDS = (tuple(b for b in _requested.split(",") if b) if _requested else
                      tuple(dict.fromkeys(GRID.backends + sum((s.backends for s in GRID.sections), ()))))
_availability = ops.available_backends(DEVICE, DTYPE)
UNAVAILABLE = {
    b: _availability.get(b, "not a tunecomp backend") for b in REQUESTED_BACKENDS
    if _availability.get(b, "not a tunecomp backend") is not None
}
BACKENDS = tuple(b for b in REQUESTED_BACKENDS if b not in UNAVAILABLE)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str  # "masked", "blended" or "ceiling"
    direction: str  # "fwd", "fwd+bwd" ("" for ceilings)
    impl: str  # a tunecomp backend, a baseline, or the ceiling's name
    role: str  # "backend", "baseline" or "ceiling"
    in_features: int = 0
    out_features: int = 0
    tokens: int = 0
    rank: int = 0  # 0 for dense
    rho: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def id(self) -> str:
        if self.role == "ceiling":
            return f"ceiling-{self.impl}"
        point = f"{self.in_features}x{self.out_features}-n{self.tokens}"
        if self.impl != "dense":
            point += f"-r{self.rank}-rho{self.rho:g}"
        return f"{self.op}-{self.direction}-{self.impl}-{point}"


def grid_baselines(grid: Grid) -> dict:
    """op -> the baselines this grid times it against."""
    return {**BASELINES, **dict(grid.baselines)}


def grid_cases(grid: Grid, backends) -> list:
    """Every case of the grid, timing those of ``backends`` that each section names (the
    grid's own or the section's extra ones)."""
    cases, dense_seen = [], set()
    for s in grid.sections:
        timed = [b for b in dict.fromkeys(grid.backends + s.backends) if b in backends]
        for n_in, n_out in s.shapes:
            for tokens in s.tokens:
                for rank, rho in s.ranks_rhos:
                    point = dict(in_features=n_in, out_features=n_out, tokens=tokens)
                    for impl in timed:
                        cases.append(Case(s.op, s.direction, impl, "backend", rank=rank, rho=rho, **point))
                    for impl in grid_baselines(grid)[s.op]:
                        if impl == "dense":
                            # Dense does not depend on rank or rho: timed once per shape and tokens.
                            key = (s.direction, n_in, n_out, tokens)
                            if key in dense_seen:
                                continue
                            dense_seen.add(key)
                            cases.append(Case(s.op, s.direction, impl, "baseline", **point))
                        else:
                            cases.append(Case(s.op, s.direction, impl, "baseline", rank=rank, rho=rho, **point))
    return cases


CASES = grid_cases(GRID, BACKENDS)


def work(case: Case, elem_bytes: int) -> tuple:
    """(bytes, flops): the least HBM traffic and the useful FLOPs of one call.

    Bytes: X read and Y written once, every weight, mask (1 byte per entry) and bias read
    once. fwd+bwd adds the backward's own floor: dY read, X read again (for the weight
    gradients), dX written, weights and masks read again, weight and bias gradients written.
    FLOPs: 2*N*r*(in+out)*(1-rho) for the rank-r chain, the products of kept factor entries
    (2*N*in*out for dense); the backward does twice the forward's GEMM work, so fwd+bwd counts
    3x. The blend adds the teacher GEMM
    2*N*in*out forward and the same again in the backward for dX (the teacher gets no
    gradient). Recomputed intermediates and the bias add are not counted.
    """
    n, n_in, n_out = case.tokens, case.in_features, case.out_features
    if case.impl == "dense":
        weights, masks, flops = n_in * n_out, 0, 2 * n * n_in * n_out
    else:
        weights = case.rank * (n_in + n_out)
        masks, flops = weights, round(2 * n * case.rank * (n_in + n_out) * (1 - case.rho))
    teacher = n_in * n_out if case.op == "blended" else 0  # W0; never written
    teacher_bias = n_out if teacher else 0
    if case.direction == "fwd":
        elems = n * n_in + n * n_out + weights + n_out + teacher + teacher_bias
        n_bytes = elems * elem_bytes + masks
        flops += 2 * n * teacher
    else:
        elems = 3 * n * n_in + 2 * n * n_out + 3 * weights + 2 * n_out + 2 * teacher + teacher_bias
        n_bytes = elems * elem_bytes + 2 * masks
        flops = 3 * flops + 4 * n * teacher
    return n_bytes, flops


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def eager_masked(x, u, v, bias, mask_u, mask_v):
    """The op as plain PyTorch: mask multiply, two matmuls, bias (fused into the second)."""
    return F.linear(x @ (v * mask_v), u * mask_u, bias)


def eager_blended(x, u, v, bias, mask_u, mask_v, teacher_weight, teacher_bias, alpha):
    a = alpha.to(x.dtype)
    student = eager_masked(x, u, v, bias, mask_u, mask_v)
    return a * F.linear(x, teacher_weight, teacher_bias) + torch.sqrt(1 - a * a) * student


_compiled = {"key": None, "fn": None}


def compiled_eager(case: Case):
    key = (case.op, case.direction, case.in_features, case.out_features, case.tokens, case.rank)
    if _compiled["key"] != key:
        # One shape's graphs at a time: dynamo checks the guards of every cached graph of a
        # function on each call, host overhead a real (one-shape) model would not pay. Points
        # differing only in rho share the graph (cases are ordered so they are adjacent).
        torch._dynamo.reset()
        _compiled.update(key=key, fn=torch.compile(eager_masked, dynamic=False))
    return _compiled["fn"]


def _randn(*shape, scale=1.0, grad=False):
    t = torch.randn(*shape, device=DEVICE, dtype=DTYPE) * scale
    return t.requires_grad_(grad)


def make_op(case: Case, grad: bool):
    """(fn, params): ``fn(x) -> y`` for this case and the tensors it differentiates besides x."""
    n_in, n_out, rank = case.in_features, case.out_features, case.rank
    if case.impl == "dense":
        weight = _randn(n_out, n_in, scale=n_in ** -0.5, grad=grad)
        bias = _randn(n_out, scale=0.1, grad=grad)
        return (lambda x: F.linear(x, weight, bias)), (weight, bias)
    u = _randn(n_out, rank, scale=rank ** -0.5, grad=grad)
    v = _randn(n_in, rank, scale=n_in ** -0.5, grad=grad)
    bias = _randn(n_out, scale=0.1, grad=grad)
    keep = 1.0 - case.rho
    mask_u = torch.rand(n_out, rank, device=DEVICE) < keep
    mask_v = torch.rand(n_in, rank, device=DEVICE) < keep
    params = (u, v, bias)
    if case.op == "masked":
        if case.role == "backend":
            def fn(x):
                return ops.masked_lowrank_linear(x, u, v, bias, mask_u, mask_v, backend=case.impl)
        else:
            eager = compiled_eager(case) if case.impl == "compile" else eager_masked

            def fn(x):
                return eager(x, u, v, bias, mask_u, mask_v)
        return fn, params
    teacher_weight = _randn(n_out, n_in, scale=n_in ** -0.5)
    teacher_bias = _randn(n_out, scale=0.1)
    # A float32 device tensor, as FusedPrunedLowRankLinear's alpha_tensor buffer: no
    # host-to-device copy per call.
    alpha = torch.tensor(0.5, device=DEVICE)
    teacher = (teacher_weight, teacher_bias, alpha)
    if case.role == "backend":
        def fn(x):
            return ops.blended_lowrank_linear(x, u, v, bias, mask_u, mask_v, *teacher,
                                              backend=case.impl)
    else:
        assert case.impl == "eager", case.impl

        def fn(x):
            return eager_blended(x, u, v, bias, mask_u, mask_v, *teacher)
    return fn, params


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed_round(step: Callable[[int], object], n_buffers: int, k: int, grad: bool):
    """One timed round: ``k`` calls over rotating buffers, then a sync."""
    def run():
        with torch.set_grad_enabled(grad):
            for i in range(k):
                step(i % n_buffers)
        sync()
    return run


def calls_per_round(step, n_buffers, grad) -> int:
    probe = timed_round(step, n_buffers, 3, grad)
    probe()
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        probe()
        seconds.append((time.perf_counter() - start) / 3)
    return max(1, min(GRID.max_k, math.ceil(GRID.round_s / min(seconds))))


WARMUP_ROUNDS = 1


def measure(benchmark, step, n_buffers: int, grad: bool, extra: dict, paired=None) -> None:
    """Times ``step``. With ``paired`` ({baseline: step}), the baselines are timed in rounds
    alternating with step's (``pairing.pedantic_paired``) and ``extra_info["paired"][baseline]``
    holds the baseline's median per-call time and its paired speedup ratio."""
    paired = paired or {}
    # Warm-up outside the timed rounds: autotuning, compilation, allocator growth.
    with torch.set_grad_enabled(grad):
        for fn in (step, *paired.values()):
            for i in range(n_buffers):
                fn(i)
    sync()
    k = calls_per_round(step, n_buffers, grad)
    baselines = {}
    for impl, fn in paired.items():
        k_impl = calls_per_round(fn, n_buffers, grad)
        baselines[impl] = (timed_round(fn, n_buffers, k_impl, grad), k_impl)
    benchmark.extra_info.update(extra, k=k, n_buffers=n_buffers)
    info = pedantic_paired(benchmark, timed_round(step, n_buffers, k, grad), baselines,
                           rounds=GRID.rounds, warmup_rounds=WARMUP_ROUNDS, calls=k)
    if info:
        benchmark.extra_info["paired"] = info


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _record_run(bench_run):
    bench_run.update(
        grid=GRID_NAME, device=str(DEVICE), dtype=DTYPE_NAME,
        backends=list(BACKENDS), unavailable_backends=UNAVAILABLE,
        baselines={op: list(impls) for op, impls in grid_baselines(GRID).items()},
        sections=[asdict(s) for s in GRID.sections],
        timed_ops=sorted({(c.impl, c.op, c.direction) for c in CASES if c.role == "backend"}),
    )


CEILINGS = [Case("ceiling", "", "copy", "ceiling"), Case("ceiling", "", "matmul", "ceiling")]


@pytest.mark.parametrize("case", CEILINGS, ids=lambda c: c.id)
def test_ceiling(benchmark, case):
    elem_bytes = torch.finfo(DTYPE).bits // 8
    if case.impl == "copy":
        src = _randn(GRID.copy_bytes // elem_bytes)
        dst = torch.empty_like(src)
        step = lambda i: dst.copy_(src)  # noqa: E731
        extra = dict(bytes=2 * src.numel() * elem_bytes, flops=0)
    else:
        n = GRID.matmul_size
        a, b, c = _randn(n, n), _randn(n, n), torch.empty(n, n, device=DEVICE, dtype=DTYPE)
        step = lambda i: torch.mm(a, b, out=c)  # noqa: E731
        extra = dict(bytes=3 * n * n * elem_bytes, flops=2 * n ** 3, size=n)
    benchmark.group = "ceilings"
    measure(benchmark, step, 1, False, dict(case.as_dict(), dtype=DTYPE_NAME, **extra))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel(benchmark, case, within_budget):
    grad = case.direction == "fwd+bwd"
    elem_bytes = torch.finfo(DTYPE).bits // 8
    per_buffer = case.tokens * (case.in_features + (case.out_features if grad else 0)) * elem_bytes
    n_buffers = max(2, min(8, ROTATE_BYTES // per_buffer))
    xs = [_randn(case.tokens, case.in_features, grad=grad) for _ in range(n_buffers)]
    grad_ys = [_randn(case.tokens, case.out_features) for _ in range(n_buffers)] if grad else None

    def make_step(impl_case):
        fn, params = make_op(impl_case, grad)
        if not grad:
            return lambda i: fn(xs[i])
        if not GRID.params_change:
            return lambda i: torch.autograd.grad(fn(xs[i]), (xs[i], *params), grad_ys[i])

        def step(i):
            with torch.no_grad():
                for p in params:
                    p.mul_(1.0)
            return torch.autograd.grad(fn(xs[i]), (xs[i], *params), grad_ys[i])
        return step

    paired = None
    if GRID.paired and case.role == "backend":
        paired = {impl: make_step(replace(case, impl=impl, role="baseline"))
                  for impl in grid_baselines(GRID)[case.op]}
    n_bytes, flops = work(case, elem_bytes)
    benchmark.group = f"{case.op} {case.direction} {case.in_features}x{case.out_features} n={case.tokens}"
    measure(benchmark, make_step(case), n_buffers, grad,
            dict(case.as_dict(), dtype=DTYPE_NAME, bytes=n_bytes, flops=flops,
                 params_change=grad and GRID.params_change), paired)
