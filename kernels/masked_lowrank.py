"""Triton kernels of ``y = (x @ Vm) @ Um.T + bias`` (forward and backward, side by side).

``Um = where(mask_u, u, 0)`` and ``Vm = where(mask_v, v, 0)`` are never built: every kernel
loads a tile of the factor and of its mask and selects with ``tl.where`` on the fly, so a NaN
stored in a pruned entry cannot leak (``0 * NaN`` would) and no dense masked copy is written.

Forward design (one launch)
---------------------------
Grid ``(cdiv(N, BLOCK_M), cdiv(out, BLOCK_N * OUT_TILES))``. A program owns ``BLOCK_M`` tokens
and a group of ``OUT_TILES`` consecutive output tiles:

1. K loop over ``in``: ``T[BLOCK_M, r] += X_tile @ Vm_tile`` in fp32 registers. X is read
   once per program; T never leaves the chip.
2. For each output tile of the group: ``Y_tile = T @ Um_tile.T + bias``, one ``tl.dot`` per
   rank chunk, bias added in fp32, one store.

Rank handling: the whole rank is held at once, as up to three column chunks of T whose widths
are powers of two (``rank_chunks``: ``tl.arange`` needs a power of two), adding up to the rank
rounded up to a multiple of 16 (192 = 128 + 64; 307 -> 256 + 64; padded columns load as zeros
and add nothing). Padding to one power of two instead (as before) wasted up to 2x the rank
FLOPs and factor bytes just above one: 33% at r=192 (256), 67% at r=307 (512). Each chunk is
one more dot per K step with the same X tile. Register pressure grows with r, which the
config pruning below handles (``prune_forward_configs``: large ranks only get thin tiles).
Looping over rank chunks in sequence instead would force either storing T or re-reading X
once per chunk.

``OUT_TILES`` is the knob between the two designs DESIGN.md asks to measure: ``OUT_TILES=1``
recomputes T for every output tile (most parallelism, ``out/BLOCK_N`` times the X@V FLOPs),
a large ``OUT_TILES`` holds T across the whole row block (X@V computed once, fewer programs).
The autotuner picks per shape. Measured on an H200 (bf16, 768->768, 12608 tokens, r=192,
2026-11-26, each config on its own with CUDA events, the config list before the one below):
the OUT_TILES=1 configs took 1.07-2.68 ms, those holding T 0.17-0.27 ms. The best, 0.17 ms,
was 2.7x the eager two-GEMM chain (62 us) and 5.9x a dense layer of the same size (29 us).
This is why ``ops`` "auto" does not pick this backend on CUDA.

Pipelining (read from the TTGIR that Triton 3.6 and 3.8 compile for sm_90, no GPU needed): a
factor tile that goes through ``tl.where`` before the dot cannot be copied straight into the
dot's shared-memory operand; Triton copies it and its mask asynchronously into
``num_stages - 1`` buffers, selects in registers, and stores the result to shared memory again.
With 2 stages that is one buffer: each K step waits for its own load (``async_wait`` 0), with
no load in flight behind it. The 0.17 ms pick above was such a config (BLOCK 64/64/16,
OUT_TILES=16, 2 stages): 48 + 12 fully exposed load latencies per program, two waves of
programs. At rank 192 (then padded to 256) the list had no T-holding config with more stages that fit shared
memory, which is why the current list carries four (the mask tiles, one byte per entry, take
half as much shared memory again as the factor tiles). Prediction for the same shape, not yet
measured: BLOCK_M=128 (99 programs, one wave, V and U read once per program from L2), 3-4
stages, about 20-40 us.

Backward design (five launches, N x r intermediates in HBM, which is allowed)
-----------------------------------------------------------------------------
``T = X @ Vm`` and ``G = s * (dY @ Um)`` (``_rank_project_kernel``), then
``dX = G @ Vm.T [+ a * dY @ W0]`` (``_grad_x_kernel``), ``dU = where(Mu, s * dY.T @ T, 0)``
with ``db = s * sum(dY)`` fused in (``_grad_factor_kernel``), ``dV = where(Mv, X.T @ G, 0)``
(same kernel; split over tokens into fp32 partial sums when the [d, r] output has fewer tiles
than the GPU has SMs, see ``tokens_per_split``). ``s``/``a`` come from the blend
(``blended_lowrank.py``); here s = 1, a = 0.
T and G are stored in the input dtype, as the eager reference rounds them.

Precision: every ``tl.dot`` accumulates in fp32. For fp32 inputs ``input_precision`` is
``dot_precision()``: "ieee" under the interpreter, and on GPU it follows torch's fp32 matmul
setting (``torch.backends.cuda.matmul.fp32_precision`` where set, else
``torch.get_float32_matmul_precision()``: "highest", torch's default, gives "ieee";
"high"/"medium" give "tf32"), so the kernels round exactly as much as cuBLAS would for the
same process setting. It is part of every autotune key: tf32 tiles need more shared memory,
so a config tuned under "ieee" may not fit under "tf32". fp16/bf16 ignore it.

Strides: every tensor is read through its strides (no ``.contiguous()`` copies), masks are
reinterpreted as uint8 (a free view). Offsets are int64 so ``N * in`` beyond 2**31 is safe.
Triton specializes each kernel on which integer arguments (strides included) are divisible by
16, and copies a tile asynchronously only where its rows are known to be aligned: factors whose
rank is not a multiple of 16 (row stride 307, say) compile to a binary whose factor and mask
loads are synchronous (sm_90 TTGIR, benchmarks/kernel_resources.py's ``sync`` column). Hence
ranks in multiples of 16 on a GPU (README, ``tunecomp.deploy.GPU_RANK_MULTIPLE``).

Autotune: small config sets (5-10 per kernel) keyed on (token bucket = next_pow2(N), in, out,
rank, and the dtypes, which Triton adds to every key); the two forward kernels key on the
rank chunks instead, which is what their binaries depend on, so layers whose ranks differ
after export drops dead components share a tuning. The forward configs are first
pruned by an estimate of live registers per thread, so large ranks never time configs that
would spill; the smallest single-stage config always stays a candidate, as the one that fits
shared memory up to the largest rank these kernels take (``max_rank``, which ``tunecomp.ops``
enforces when it picks the backend).
The first call per new key compiles and times every surviving config: compiling one config
for sm_90 took 0.3-2 s on a 2-core CPU (up to ~7 s for rank 384), timing ~0.1 s each, so
roughly 5-20 s per kernel and key. The choice is then cached in-process, and on disk by
Triton (``cache_results=True``, Triton >= 3.2; compiled binaries always are): keyed on Triton's
version, the GPU architecture, the kernel's source, the autotune key and the config list, so a
later process on the same machine (the next training run, gpu_check's next stage) skips the
timing and runs the same pick. To re-tune, delete Triton's cache directory
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``). A training step uses up to 6 kernels
(forward + 5 backward launches), so the first step of each new layer shape pays this once per
machine. Warm up before CUDA-graph capture: autotuning cannot run inside a capture.
Under ``TRITON_INTERPRET=1`` a single small config is used (tuning there is meaningless and
slow), with 16-wide tiles so that tests with tiny shapes still cross tile boundaries.
``TUNECOMP_TRITON_ONE_CONFIG=1`` (read at import; the GPU test runs set it) gives each kernel
one GPU config that fits every shape, with no autotuning: the test battery's hundreds of
shapes would otherwise each compile and time every config (estimated 15-25 min on an H100).
Every config is then checked on its own by ``test_every_gpu_config_on_the_gpu``.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from . import _env_flag, _interpreting, cdiv, next_power_of_2

# Triton chooses interpreter or compiler when a function is decorated, i.e. now, at import.
BUILT_FOR_INTERPRETER = _interpreting()
ONE_CONFIG = _env_flag("TUNECOMP_TRITON_ONE_CONFIG")
# Autotune choices go to Triton's disk cache too (see the module docstring: "Autotune").
DISK_CACHE = True


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input_precision for operands of ``dtype`` (see the module docstring); fp16
    and bf16 ignore it."""
    if dtype != torch.float32 or BUILT_FOR_INTERPRETER:
        return "ieee"
    # torch >= 2.9 has a per-backend setting; once it is set, the legacy getter raises
    # ("mix of the legacy and new APIs"). Read the new one first.
    matmul = getattr(torch.backends.cuda, "matmul", None)
    new_api = getattr(matmul, "fp32_precision", None)
    if new_api in ("ieee", "tf32"):
        return new_api
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def token_bucket(n_tokens: int) -> int:
    """Autotune key for the token count: a new N only re-tunes when it changes power of two."""
    return next_power_of_2(n_tokens)


# Token split of the factor gradients (dU, dV: outputs [d, r], reduced over the N tokens). A
# [768, 192] output is 36 tiles of 64 x 64, a quarter of an H100's 132 SMs, each looping over
# every token. Below one tile per SM the tokens are cut into splits that each write fp32
# partial sums, added up by torch afterwards: about two programs per SM, each split a multiple
# of SPLIT_ALIGN tokens (every BLOCK_T divides it), and no more splits than there are chunks
# of 4 * SPLIT_ALIGN tokens. The CUDA backend's split-K has the same form with its own tile
# and alignment (32-token steps, csrc/lowrank_cuda_ops.h), so it starts splitting at fewer
# tokens. The tiles counted are 64 x 64 whatever config the autotuner
# picks, so the split (and the partial buffer) is known before the launch. Under the
# interpreter the tiles are 16 wide and the "GPU" has INTERPRETER_SMS SMs, so that the tests'
# small shapes split too.
SPLIT_TILE, SPLIT_ALIGN = (16, 16) if BUILT_FOR_INTERPRETER else (64, 128)
INTERPRETER_SMS = 8


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def tokens_per_split(n_tokens: int, d_dim: int, rank: int, device: torch.device) -> int:
    """How many tokens each program of ``_grad_factor_kernel`` reduces over (``n_tokens``:
    no split). See SPLIT_TILE above."""
    sms = _multiprocessor_count(device)
    tiles = cdiv(d_dim, SPLIT_TILE) * cdiv(rank, SPLIT_TILE)
    if tiles == 0 or tiles >= sms:  # tiles 0: an empty gradient (in or out features 0)
        return n_tokens
    splits = min(cdiv(2 * sms, tiles), cdiv(n_tokens, 4 * SPLIT_ALIGN))
    if splits <= 1:
        return n_tokens
    return cdiv(cdiv(n_tokens, splits), SPLIT_ALIGN) * SPLIT_ALIGN


MAX_RANK_CHUNKS = 3


def rank_chunks(rank: int) -> tuple:
    """The widths of the column chunks the forward kernels hold T in: powers of two, each at
    least 16 (``tl.arange`` and ``tl.dot`` need both), widest first, adding up to the smallest
    multiple of 16 at least ``rank`` that is a sum of at most ``MAX_RANK_CHUNKS`` of them.
    192 -> (128, 64), 307 -> (256, 64), 384 -> (256, 128), 200 -> (128, 64, 16),
    240 -> (256,) (four chunks would be needed for 240 itself)."""
    padded = max(16, cdiv(rank, 16) * 16)
    while bin(padded // 16).count("1") > MAX_RANK_CHUNKS:
        padded += 16
    return tuple(1 << b for b in range(padded.bit_length() - 1, 3, -1) if padded >> b & 1)


def rank_pad(rank: int) -> int:
    """The rank the forward kernels compute with: the sum of ``rank_chunks(rank)``."""
    return sum(rank_chunks(rank))


@functools.lru_cache(maxsize=None)  # called on every forward launch: 3.4 us uncached
def chunk_args(rank: int) -> dict:
    """The forward kernels' rank constexprs: R0 >= R1 >= R2 (unused ones 16, never read) and
    N_CHUNKS."""
    chunks = rank_chunks(rank)
    widths = chunks + (16,) * (MAX_RANK_CHUNKS - len(chunks))
    return dict(R0=widths[0], R1=widths[1], R2=widths[2], N_CHUNKS=len(chunks))  # only ** unpacked


def configs(gpu_configs, interpreter_config, one_config: int):
    """The autotune list: ``gpu_configs``, or the interpreter's single config, or under
    ONE_CONFIG ``gpu_configs[one_config]``, a config that fits every shape."""
    if BUILT_FOR_INTERPRETER:
        return [interpreter_config]
    return [gpu_configs[one_config]] if ONE_CONFIG else gpu_configs


def _cfg(num_warps=4, num_stages=2, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Budget (tile elements per thread) for what a forward program keeps live: T [BLOCK_M, rank_pad],
# the output accumulator, the V and U tiles and (blended) the W0 tile. Calibrated on sm_90
# cubins of the forward kernel (ptxas resource usage, fp16, aligned unit-stride inputs as Triton
# specializes contiguous tensors): configs above ~450 spilled or needed more shared memory than
# an H100 has, so they are not even compiled. The budget is a proxy, not a guarantee: what the
# kept configs compile to, per dtype and rank, is in benchmarks/results/resources-cuda90-*.md
# (benchmarks/kernel_resources.py, no GPU needed). A few kept ones spill a little or exceed the
# shared memory; autotuning times the former and skips the latter (OutOfResources), and the
# last config of each forward list, always kept, fits. Strided or unaligned inputs compile to a separate,
# unpipelined binary that spills earlier; the autotune key does not see alignment, so such
# calls reuse the config tuned for the first (usually aligned) call.
_REGISTER_BUDGET = 400


# And T itself, BLOCK_M x (padded rank) fp32 values, at most this many per thread: 128-row
# tiles at rank 384 (192 per thread) passed the budget above but needed more shared memory
# than an H100 has; at rank 320 (160) they compiled to 224-249 registers without spilling.
_T_PER_THREAD = 160


def _live_elements_per_thread(cfg, r_pad):
    m, n, k = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    return (m * r_pad + m * n + k * r_pad + r_pad * n + k * n) / (32 * cfg.num_warps)


def _within_budget(cfg, r_pad) -> bool:
    return (_live_elements_per_thread(cfg, r_pad) <= _REGISTER_BUDGET
            and cfg.kwargs["BLOCK_M"] * r_pad <= _T_PER_THREAD * 32 * cfg.num_warps)


def chained_chunks_ok(cfg, rank) -> bool:
    """False for a config whose output tiles would chain more than one rank chunk's ``tl.dot``
    through one accumulator (``times_um_t``) in tiles of 64 rows or more.

    Measured on an H200 (Triton 3.6, bf16, 2026-11-27, ``test_every_gpu_config_on_the_gpu``):
    two such configs gave wrong outputs, errors of 0.16 and 1.7 times the result (BLOCK_M 64:
    BLOCK_N 64 / OUT_TILES 4 / 4 warps at rank 70 = chunks 64 + 16; BLOCK_N 128 / OUT_TILES 1 /
    8 warps at rank 300 = 256 + 32 + 16), while the 16-row configs gave the right ones at both
    ranks. 64-row tiles and more are where Triton lowers ``tl.dot`` to Hopper's wgmma, and
    Triton has a known miscompile of dots chained through one accumulator on that kind of path
    (Blackwell's, triton-lang/triton#10821). The cause on Hopper is not established: this
    keeps the configs that computed right, and the GPU test still runs the ones it removes and
    reports whether they compute right there."""
    return len(rank_chunks(rank)) == 1 or cfg.kwargs["BLOCK_M"] < 64


def prune_forward_configs(configs_list, named_args, **kwargs):
    """The configs within the register budget and, where the rank takes several chunks, with
    tiles of fewer than 64 rows (``chained_chunks_ok``); and always the list's last one: both
    forward lists end with their smallest single-stage config (ONE_CONFIG's pick, 16 rows),
    the one that fits shared memory up to ``max_rank`` on every GPU from sm_80 on; at large
    ranks every config within the budget may need more (fp32, rank 1024: more than an H100
    has; benchmarks/kernel_resources.py --ranks 768 --dtypes float32)."""
    if len(configs_list) == 1:
        return configs_list
    # rank is a positional argument, which every Triton 3.x passes in named_args.
    rank = named_args["rank"]
    r_pad = rank_pad(rank)
    kept = [c for c in configs_list[:-1] if _within_budget(c, r_pad) and chained_chunks_ok(c, rank)]
    return kept + configs_list[-1:]


def mask_arg(mask: Optional[torch.Tensor], fallback: torch.Tensor):
    """(pointer argument, strides) for an optional bool mask; uint8 view costs nothing."""
    if mask is None:
        return fallback, (0, 0)
    m = mask.view(torch.uint8)
    return m, (m.stride(0), m.stride(1))


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for an autotuned kernel, past ``Autotuner.run`` and
    ``JITFunction.run`` once both have seen a call like this one.

    Those two rebuild, on every call, what only changes with the arguments' shapes: the
    autotuner its key (a dict of every argument, ``str`` of each dtype), the JIT function its
    specialization (each argument through Triton's C++ specializer, the launch options, the
    launch hooks' metadata). For these kernels' 25-33 arguments that is most of a launch's
    host time (benchmarks/KERNEL_LOG.md, "Host time"), and on the GPU hosts measured so far
    the Triton calls were host-bound. So a call goes one of three ways:

    1. Seen before (``_direct``): a call with the same *signature* (``_signature``: the
       device, the debug settings, each positional tensor's dtype and 16-byte alignment, the
       type and value of every other argument) launches the kernel such a call compiled,
       with the same arguments in the same order, straight through its launcher
       (``CompiledKernel.run``, the call ``JITFunction.run`` ends in), as long as the
       autotuner would still pick the same config (its cache, config list and key names)
       and the JIT function would still find the same kernel (its cache not dropped, no
       pre-run hook, its globals unchanged). The signature determines everything Triton
       specializes on (dtypes, alignment, integer values) and the autotuner's key, so this
       never launches another kernel or config than the slow ways would; it is only
       stricter (any change of an integer is a new signature).
    2. Tuned key (``_launch_tuned``): the autotuner's key, built from the key arguments'
       positions, is in the autotuner's own cache: the cached config runs through
       ``JITFunction.run`` (which compiles on a miss), recorded as ``best_config`` as
       ``Autotuner.run`` would, and the compiled kernel is kept for way 1.
    3. Otherwise through ``Autotuner.run``, which tunes or reads Triton's disk cache.

    The key is Triton's (3.6-3.8): the key arguments' values, then ``str(dtype)`` of each
    argument that has a dtype, in argument order. Calls this does not cover the same way go
    through the autotuner: a keyword argument with a dtype, a key argument left to its
    default, a config with a pre-hook. Launch hooks (profilers such as proton) take the slow
    ways, which build their metadata. Should a Triton release build its key otherwise, every
    call misses and takes the autotuner's route: slower, never a different config. Not
    seen: a ``triton.Config`` edited in place (replace it, or the config list, instead).
    """
    if not isinstance(kernel, Autotuner):  # a stand-in (benchmarks/kernel_resources.py)
        kernel[grid](*args, **kwargs)
        return
    fn = kernel.fn
    signature = _signature(fn, args, kwargs) if isinstance(fn, JITFunction) else None
    if signature is not None and _direct(kernel, grid, signature, args):
        return
    _launch_tuned(kernel, grid, signature, args, kwargs)


def _launch_tuned(kernel, grid, signature, args, kwargs) -> None:
    """Ways 2 and 3 of ``launch``."""
    configs = kernel.configs
    key = None
    if len(configs) == 1:
        config = configs[0]
    else:
        keys, positions = _KEY_POSITIONS.get(kernel, (None, None))
        if keys != kernel.keys:  # first call, or a caller changed the key names
            keys = list(kernel.keys)
            positions = [kernel.arg_names.index(k) for k in keys if k in kernel.arg_names]
            _KEY_POSITIONS[kernel] = keys, positions
        if any(hasattr(a, "dtype") for a in kwargs.values()) or \
                any(i >= len(args) and kernel.arg_names[i] not in kwargs for i in positions):
            kernel[grid](*args, **kwargs)
            return
        key = tuple(args[i] if i < len(args) else kwargs[kernel.arg_names[i]] for i in positions)
        key += tuple(str(a.dtype) for a in args[:len(kernel.arg_names)] if hasattr(a, "dtype"))
        config = kernel.cache.get(key)
        if config is None:
            kernel[grid](*args, **kwargs)
            return
    if config.pre_hook is not None:
        kernel[grid](*args, **kwargs)
        return
    kernel.best_config = config
    fn = kernel.fn
    compiled = fn.run(*args, grid=grid, warmup=False, **kwargs, **config.all_kwargs())
    if signature is None or not isinstance(compiled, CompiledKernel) or compiled.function is None:
        return
    # the values the JIT function passed for the parameters after the positional ones
    # (keyword arguments, the config's, defaults): fixed by the signature and the config
    given = {**kwargs, **config.kwargs}
    tail = [given[name] if name in given else fn.signature.parameters[name].default
            for name in fn.arg_names[len(args):]]
    launches = _LAUNCHES.setdefault(kernel, {})
    if len(launches) >= 1024:  # one per layer shape and token count in use is plenty
        launches.clear()
    entry = (key, list(kernel.keys), config, fn.device_caches.get(signature[0]), compiled, tail)
    try:
        launches[signature] = entry
    except TypeError:  # an unhashable argument (Triton takes some): this call stays slow
        pass


def _signature(fn, args, kwargs):
    """What a call's kernel and config depend on (``launch``, way 1), or None where Triton's
    state says to take the slow way: a launch hook set (its metadata is built there), or a
    stages-inspection hook (3.7 on). The knobs are those ``JITFunction.run`` reads in
    Triton 3.6-3.8. Values go with their types: 2, 2.0 and True are equal keys but
    specialize as i32, fp32 and i1."""
    runtime = knobs.runtime
    if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook) or \
            getattr(runtime, "add_stages_inspection_hook", None) is not None:
        return None
    facts = tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (a.__class__, a)
                   for a in args])
    return (driver.active.get_current_device(), fn.debug, runtime.debug,
            getattr(knobs.compilation, "instrumentation_mode", None), facts,
            tuple([(name, value.__class__, value) for name, value in kwargs.items()]))


def _hooked(hook) -> bool:
    """Whether a launch hook is set: a chain with calls in it (Triton 3.6-3.8), or anything
    else but None assigned in its place."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _direct(kernel, grid, signature, args) -> bool:
    """Way 1 of ``launch``; False where it does not apply (the caller takes the others)."""
    launches = _LAUNCHES.get(kernel)
    try:
        entry = launches.get(signature) if launches is not None else None
    except TypeError:  # an unhashable argument: never stored either
        return False
    if entry is None:
        return False
    key, keys, config, device_cache, compiled, tail = entry
    # the config Autotuner.run would pick now: a caller may force one config, clear the
    # cache or rename the key
    configs = kernel.configs
    if len(configs) == 1:
        held = configs[0]
    else:
        held = kernel.cache.get(key) if key is not None and kernel.keys == keys else None
    fn = kernel.fn
    device = signature[0]
    if held is not config or fn.device_caches.get(device) is not device_cache or fn.pre_run_hooks \
            or _globals_changed(fn):
        return False
    kernel.best_config = config
    values = (*args, *tail)
    if callable(grid):
        grid = grid(dict(zip(fn.arg_names, values)))
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                 driver.active.get_current_stream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *values)
    return True


def _globals_changed(fn) -> bool:
    """Whether a global the kernel's source reads changed since it compiled (JITFunction.run
    raises then: the slow way does)."""
    missing = object()
    return any(scope.get(name, missing) != value for (name, _), (value, scope) in fn.used_global_vals.items())


# kernel -> {call signature: (autotuner key or None, key names, config, the JIT function's
# caches for the device, compiled kernel, trailing values)}; weak: a kernel no one holds goes
_LAUNCHES = weakref.WeakKeyDictionary()


# kernel -> (its key names, their positions among its arguments)
_KEY_POSITIONS = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def load_tile(ptr, rows, cols, n_rows, n_cols, stride_r, stride_c):
    """A [len(rows), len(cols)] tile, zeros outside the matrix. Swap the strides to read a
    transposed tile."""
    in_bounds = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=in_bounds,
                   other=0.0)


@triton.jit
def store_tile(ptr, rows, cols, n_rows, n_cols, stride_r, stride_c, tile):
    """Store a [len(rows), len(cols)] tile in ptr's dtype, skipping entries outside the matrix."""
    in_bounds = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
             tile.to(ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def load_masked_tile(ptr, mask_ptr, rows, cols, n_rows, n_cols, stride_r, stride_c,
                     mstride_r, mstride_c, HAS_MASK: tl.constexpr):
    """A factor tile with pruned entries replaced by exact zeros (select, never multiply)."""
    tile = load_tile(ptr, rows, cols, n_rows, n_cols, stride_r, stride_c)
    if HAS_MASK:
        in_bounds = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        keep = tl.load(mask_ptr + rows[:, None] * mstride_r + cols[None, :] * mstride_c,
                       mask=in_bounds, other=0)
        tile = tl.where(keep != 0, tile, 0.0)
    return tile


@triton.jit
def student_scale(alpha_ptr):
    """(a, s) with s = sqrt(1 - a^2), read from device memory so that a changing alpha needs
    neither a host sync nor a recompile (CUDA graphs replay with the new value). s as
    sqrt((1 - a)(1 + a)), accurate near a = 1 (see ``tunecomp.reference.student_scale``); NaN
    for a outside [-1, 1], as on every backend (a tensor alpha's range is not checked)."""
    a = tl.load(alpha_ptr).to(tl.float32)
    return a, tl.sqrt((1.0 - a) * (1.0 + a))


@triton.jit
def project_chunks(x_tile, t0, t1, t2, v_ptr, mask_v_ptr, offs_k, offs_r0, offs_r1, offs_r2,
                   in_features, rank, stride_v0, stride_v1, stride_mv0, stride_mv1,
                   HAS_MASK_V: tl.constexpr, N_CHUNKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K step of ``T += X_tile @ Vm_tile`` on T's chunks (``rank_chunks``); a chunk past
    ``N_CHUNKS`` is neither loaded nor touched."""
    v_tile = load_masked_tile(v_ptr, mask_v_ptr, offs_k, offs_r0, in_features, rank,
                              stride_v0, stride_v1, stride_mv0, stride_mv1, HAS_MASK_V)
    t0 = tl.dot(x_tile, v_tile, t0, input_precision=DOT_PRECISION)
    if N_CHUNKS > 1:
        v_tile = load_masked_tile(v_ptr, mask_v_ptr, offs_k, offs_r1, in_features, rank,
                                  stride_v0, stride_v1, stride_mv0, stride_mv1, HAS_MASK_V)
        t1 = tl.dot(x_tile, v_tile, t1, input_precision=DOT_PRECISION)
    if N_CHUNKS > 2:
        v_tile = load_masked_tile(v_ptr, mask_v_ptr, offs_k, offs_r2, in_features, rank,
                                  stride_v0, stride_v1, stride_mv0, stride_mv1, HAS_MASK_V)
        t2 = tl.dot(x_tile, v_tile, t2, input_precision=DOT_PRECISION)
    return t0, t1, t2


@triton.jit
def times_um_t(t0, t1, t2, u_ptr, mask_u_ptr, offs_r0, offs_r1, offs_r2, offs_n, rank,
               out_features, stride_u0, stride_u1, stride_mu0, stride_mu1,
               HAS_MASK_U: tl.constexpr, N_CHUNKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``T @ Um[offs_n].T`` in fp32 from T's chunks (in the input dtype); Um.T tiles
    [chunk, BLOCK_N] are u read with swapped strides."""
    ut_tile = load_masked_tile(u_ptr, mask_u_ptr, offs_r0, offs_n, rank, out_features,
                               stride_u1, stride_u0, stride_mu1, stride_mu0, HAS_MASK_U)
    acc = tl.dot(t0, ut_tile, input_precision=DOT_PRECISION)
    if N_CHUNKS > 1:
        ut_tile = load_masked_tile(u_ptr, mask_u_ptr, offs_r1, offs_n, rank, out_features,
                                   stride_u1, stride_u0, stride_mu1, stride_mu0, HAS_MASK_U)
        acc = tl.dot(t1, ut_tile, acc, input_precision=DOT_PRECISION)
    if N_CHUNKS > 2:
        ut_tile = load_masked_tile(u_ptr, mask_u_ptr, offs_r2, offs_n, rank, out_features,
                                   stride_u1, stride_u0, stride_mu1, stride_mu0, HAS_MASK_U)
        acc = tl.dot(t2, ut_tile, acc, input_precision=DOT_PRECISION)
    return acc


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

FORWARD_GPU_CONFIGS = [
    # T recomputed per output tile or group of 4: the most programs, for few tokens
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, OUT_TILES=1, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, OUT_TILES=1, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, OUT_TILES=4, num_warps=4, num_stages=3),
    # T held across the row block, with 3-4 stages: a masked factor tile gets num_stages - 1
    # buffers (see "Pipelining" above). Ranks up to 128, then up to 256, then 512.
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, OUT_TILES=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, OUT_TILES=16, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, OUT_TILES=16, num_warps=8, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, OUT_TILES=16, num_warps=8, num_stages=4),
    _cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, OUT_TILES=32, num_warps=8, num_stages=3),
    # T held in 32-row tiles, the kind ranks of several chunks keep (``chained_chunks_ok``)
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, OUT_TILES=16, num_warps=4, num_stages=3),
    # large ranks with few tokens: thin K steps keep the V tile small
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, OUT_TILES=4, num_warps=8, num_stages=2),
    _cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, OUT_TILES=1, num_warps=4, num_stages=1),
]
_FORWARD_CONFIGS = configs(FORWARD_GPU_CONFIGS,
                           _cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, OUT_TILES=2), one_config=-1)


@triton.autotune(configs=_FORWARD_CONFIGS,
                 key=["n_bucket", "in_features", "out_features", "R0", "R1", "R2", "N_CHUNKS",
                      "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_forward_configs},
                 cache_results=DISK_CACHE)
@triton.jit(do_not_specialize=["n_bucket"])  # n_bucket: for the autotune key only
def _forward_kernel(
    x_ptr, u_ptr, v_ptr, bias_ptr, mask_u_ptr, mask_v_ptr, y_ptr,
    n_tokens, in_features, out_features, rank, n_bucket,
    stride_xm, stride_xk, stride_u0, stride_u1, stride_v0, stride_v1,
    stride_mu0, stride_mu1, stride_mv0, stride_mv1, stride_b, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_MASK_U: tl.constexpr, HAS_MASK_V: tl.constexpr,
    R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, N_CHUNKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_TILES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    # T's column chunks (rank_chunks); a chunk past N_CHUNKS is never loaded or used
    offs_r0 = tl.arange(0, R0).to(tl.int64)
    offs_r1 = R0 + tl.arange(0, R1).to(tl.int64)
    offs_r2 = R0 + R1 + tl.arange(0, R2).to(tl.int64)

    t0 = tl.zeros((BLOCK_M, R0), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_M, R1), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_M, R2), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x_tile = load_tile(x_ptr, offs_m, offs_k, n_tokens, in_features, stride_xm, stride_xk)
        t0, t1, t2 = project_chunks(x_tile, t0, t1, t2, v_ptr, mask_v_ptr, offs_k,
                                    offs_r0, offs_r1, offs_r2, in_features, rank,
                                    stride_v0, stride_v1, stride_mv0, stride_mv1,
                                    HAS_MASK_V, N_CHUNKS, DOT_PRECISION)
    # Round T like the eager math does, and so the second dot runs on the input dtype.
    t0_in = t0.to(x_ptr.dtype.element_ty)
    t1_in = t1.to(x_ptr.dtype.element_ty)
    t2_in = t2.to(x_ptr.dtype.element_ty)

    first_n = pid_g * (OUT_TILES * BLOCK_N)
    last_n = tl.minimum(first_n + OUT_TILES * BLOCK_N, out_features)
    for n0 in range(first_n, last_n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        acc = times_um_t(t0_in, t1_in, t2_in, u_ptr, mask_u_ptr, offs_r0, offs_r1, offs_r2,
                         offs_n, rank, out_features, stride_u0, stride_u1, stride_mu0, stride_mu1,
                         HAS_MASK_U, N_CHUNKS, DOT_PRECISION)
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_n * stride_b, mask=offs_n < out_features, other=0.0)
            acc += b.to(tl.float32)[None, :]
        store_tile(y_ptr, offs_m, offs_n, n_tokens, out_features, stride_ym, stride_yn, acc)


def forward(x, u, v, bias, mask_u, mask_v):
    n_tokens, in_features = x.shape
    out_features, rank = u.shape
    y = torch.empty((n_tokens, out_features), dtype=x.dtype, device=x.device)
    mu, mu_strides = mask_arg(mask_u, u)
    mv, mv_strides = mask_arg(mask_v, v)
    bias_arg = bias if bias is not None else y

    def grid(meta):
        return (cdiv(n_tokens, meta["BLOCK_M"]),
                cdiv(out_features, meta["BLOCK_N"] * meta["OUT_TILES"]))

    launch(_forward_kernel, grid,
        x, u, v, bias_arg, mu, mv, y,
        n_tokens, in_features, out_features, rank, token_bucket(n_tokens),
        x.stride(0), x.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        *mu_strides, *mv_strides, bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_MASK_U=mask_u is not None, HAS_MASK_V=mask_v is not None,
        **chunk_args(rank), DOT_PRECISION=dot_precision(x.dtype),
    )
    return y


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

PROJECT_GPU_CONFIGS = [
    _cfg(BLOCK_M=32, BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_R=64, BLOCK_K=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_R=128, BLOCK_K=32, num_warps=8, num_stages=3),
    # 4 stages: 3 buffers for the masked factor tile (see "Pipelining" above)
    _cfg(BLOCK_M=128, BLOCK_R=128, BLOCK_K=64, num_warps=8, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_R=64, BLOCK_K=64, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_R=32, BLOCK_K=32, num_warps=4, num_stages=2),
]
_PROJECT_CONFIGS = configs(PROJECT_GPU_CONFIGS, _cfg(BLOCK_M=16, BLOCK_R=16, BLOCK_K=16), one_config=-1)


@triton.autotune(configs=_PROJECT_CONFIGS, key=["n_bucket", "k_dim", "rank", "DOT_PRECISION"],
                 cache_results=DISK_CACHE)
@triton.jit(do_not_specialize=["n_bucket"])  # n_bucket: for the autotune key only
def _rank_project_kernel(
    a_ptr, b_ptr, mask_ptr, alpha_ptr, c_ptr,
    n_tokens, k_dim, rank, n_bucket,
    stride_am, stride_ak, stride_bk, stride_br, stride_mk, stride_mr, stride_cm, stride_cr,
    HAS_MASK: tl.constexpr, SCALE_BY_STUDENT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[N, r] = s * A[N, k] @ where(M, B[k, r]): T = X @ Vm and G = s * dY @ Um."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a_tile = load_tile(a_ptr, offs_m, offs_k, n_tokens, k_dim, stride_am, stride_ak)
        b_tile = load_masked_tile(b_ptr, mask_ptr, offs_k, offs_r, k_dim, rank,
                                  stride_bk, stride_br, stride_mk, stride_mr, HAS_MASK)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=DOT_PRECISION)
    if SCALE_BY_STUDENT:
        _, s = student_scale(alpha_ptr)
        acc = acc * s
    store_tile(c_ptr, offs_m, offs_r, n_tokens, rank, stride_cm, stride_cr, acc)


GRAD_X_GPU_CONFIGS = [
    _cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    # 4 stages: 3 buffers for the masked factor tile (see "Pipelining" above)
    _cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    _cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
]
_GRAD_X_CONFIGS = configs(GRAD_X_GPU_CONFIGS, _cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), one_config=-1)


@triton.autotune(configs=_GRAD_X_CONFIGS,
                 key=["n_bucket", "in_features", "out_features", "rank", "DOT_PRECISION"],
                 cache_results=DISK_CACHE)
@triton.jit(do_not_specialize=["n_bucket"])  # n_bucket: for the autotune key only
def _grad_x_kernel(
    g_ptr, v_ptr, mask_v_ptr, dy_ptr, w_ptr, alpha_ptr, dx_ptr,
    n_tokens, in_features, out_features, rank, n_bucket,
    stride_gm, stride_gr, stride_v0, stride_v1, stride_mv0, stride_mv1,
    stride_dym, stride_dyn, stride_w0, stride_w1, stride_dxm, stride_dxk,
    HAS_MASK_V: tl.constexpr, HAS_TEACHER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX[N, in] = G @ Vm.T (+ a * dY @ W0 when the teacher is blended in).

    The rank is a reduction here, so it is simply looped over in BLOCK_K chunks."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_K):
        offs_r = r0 + tl.arange(0, BLOCK_K).to(tl.int64)
        g_tile = load_tile(g_ptr, offs_m, offs_r, n_tokens, rank, stride_gm, stride_gr)
        vt_tile = load_masked_tile(v_ptr, mask_v_ptr, offs_r, offs_i, rank, in_features,
                                   stride_v1, stride_v0, stride_mv1, stride_mv0, HAS_MASK_V)
        acc = tl.dot(g_tile, vt_tile, acc, input_precision=DOT_PRECISION)
    if HAS_TEACHER:
        teacher = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for o0 in range(0, out_features, BLOCK_K):
            offs_o = o0 + tl.arange(0, BLOCK_K).to(tl.int64)
            dy_tile = load_tile(dy_ptr, offs_m, offs_o, n_tokens, out_features,
                                stride_dym, stride_dyn)
            w_tile = load_tile(w_ptr, offs_o, offs_i, out_features, in_features,
                               stride_w0, stride_w1)
            teacher = tl.dot(dy_tile, w_tile, teacher, input_precision=DOT_PRECISION)
        a, _ = student_scale(alpha_ptr)
        acc += a * teacher
    store_tile(dx_ptr, offs_m, offs_i, n_tokens, in_features, stride_dxm, stride_dxk, acc)


GRAD_FACTOR_GPU_CONFIGS = [
    _cfg(BLOCK_D=32, BLOCK_R=32, BLOCK_T=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_D=64, BLOCK_R=64, BLOCK_T=64, num_warps=4, num_stages=3),
    _cfg(BLOCK_D=128, BLOCK_R=64, BLOCK_T=64, num_warps=8, num_stages=3),
    _cfg(BLOCK_D=128, BLOCK_R=128, BLOCK_T=32, num_warps=8, num_stages=3),
    _cfg(BLOCK_D=128, BLOCK_R=128, BLOCK_T=64, num_warps=8, num_stages=4),
    _cfg(BLOCK_D=128, BLOCK_R=64, BLOCK_T=64, num_warps=4, num_stages=4),
    _cfg(BLOCK_D=64, BLOCK_R=32, BLOCK_T=128, num_warps=4, num_stages=2),
]
_GRAD_FACTOR_CONFIGS = configs(GRAD_FACTOR_GPU_CONFIGS, _cfg(BLOCK_D=16, BLOCK_R=16, BLOCK_T=16), one_config=0)


@triton.autotune(configs=_GRAD_FACTOR_CONFIGS, key=["n_bucket", "d_dim", "rank", "DOT_PRECISION"],
                 cache_results=DISK_CACHE)
@triton.jit(do_not_specialize=["n_bucket"])  # n_bucket: for the autotune key only
def _grad_factor_kernel(
    a_ptr, b_ptr, mask_ptr, alpha_ptr, c_ptr, db_ptr,
    n_tokens, d_dim, rank, n_bucket, tokens_per_split,
    stride_am, stride_ad, stride_bm, stride_br, stride_md, stride_mr,
    stride_cs, stride_cd, stride_cr, stride_dbs, stride_db,
    HAS_MASK: tl.constexpr, SCALE_BY_STUDENT: tl.constexpr, SUM_A: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """C[d, r] = where(M, s * A[N, d].T @ B[N, r], 0): dU = dY.T @ T, dV = X.T @ G.

    Program (i, j, k) reduces tokens [k * tokens_per_split, (k + 1) * tokens_per_split) into
    slice k of C (slices stride_cs apart; k is 0 when there is no split). The mask is applied
    to every slice, so a pruned entry is an exact zero in each and in their sum.
    With SUM_A the programs of the first rank column also write db = s * A.sum(0) (slice k
    of it): they load every A tile anyway, so the bias gradient costs no extra pass over dY."""
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t_begin = pid_s.to(tl.int64) * tokens_per_split
    t_end = tl.minimum(t_begin + tokens_per_split, n_tokens)
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        # A.T tile [BLOCK_D, BLOCK_T]: A read with swapped strides.
        at_tile = load_tile(a_ptr, offs_d, offs_t, d_dim, t_end, stride_ad, stride_am)
        b_tile = load_tile(b_ptr, offs_t, offs_r, t_end, rank, stride_bm, stride_br)
        acc = tl.dot(at_tile, b_tile, acc, input_precision=DOT_PRECISION)
        if SUM_A:
            col_sum += tl.sum(at_tile.to(tl.float32), axis=1)
    if SCALE_BY_STUDENT:
        _, s = student_scale(alpha_ptr)
        acc = acc * s
        col_sum = col_sum * s
    in_bounds = (offs_d[:, None] < d_dim) & (offs_r[None, :] < rank)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs_d[:, None] * stride_md + offs_r[None, :] * stride_mr,
                       mask=in_bounds, other=0)
        acc = tl.where(keep != 0, acc, 0.0)
    slice_ptr = c_ptr + pid_s.to(tl.int64) * stride_cs
    store_tile(slice_ptr, offs_d, offs_r, d_dim, rank, stride_cd, stride_cr, acc)
    if SUM_A:
        tl.store(db_ptr + pid_s.to(tl.int64) * stride_dbs + offs_d * stride_db,
                 col_sum.to(db_ptr.dtype.element_ty), mask=(offs_d < d_dim) & (pid_r == 0))


def _rank_project(a, b, mask, alpha):
    """``s * a @ where(mask, b, 0)`` as a fresh [N, r] tensor (s = 1 when alpha is None)."""
    n_tokens, k_dim = a.shape
    rank = b.shape[1]
    c = torch.empty((n_tokens, rank), dtype=a.dtype, device=a.device)
    m, m_strides = mask_arg(mask, b)

    def grid(meta):
        return (cdiv(n_tokens, meta["BLOCK_M"]), cdiv(rank, meta["BLOCK_R"]))

    launch(_rank_project_kernel, grid,
        a, b, m, alpha if alpha is not None else c, c,
        n_tokens, k_dim, rank, token_bucket(n_tokens),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *m_strides,
        c.stride(0), c.stride(1),
        HAS_MASK=mask is not None, SCALE_BY_STUDENT=alpha is not None,
        DOT_PRECISION=dot_precision(a.dtype),
    )
    return c


def _grad_factor(a, b, mask, alpha, grad_bias: Optional[torch.Tensor]):
    """``where(mask, s * a.T @ b, 0)``; also fills ``grad_bias = s * a.sum(0)`` if given."""
    n_tokens, d_dim = a.shape
    rank = b.shape[1]
    per_split = tokens_per_split(n_tokens, d_dim, rank, a.device)
    splits = cdiv(n_tokens, per_split)
    if splits == 1:  # straight into the result, in a's dtype
        out = torch.empty((1, d_dim, rank), dtype=a.dtype, device=a.device)
        db = grad_bias.view(1, -1) if grad_bias is not None else out[0]
    else:  # fp32 partial sums, one slice per split, added up below
        out = torch.empty((splits, d_dim, rank), dtype=torch.float32, device=a.device)
        db = (torch.empty((splits, d_dim), dtype=torch.float32, device=a.device)
              if grad_bias is not None else out[0])
    m, m_strides = mask_arg(mask, out)

    def grid(meta):
        return (cdiv(d_dim, meta["BLOCK_D"]), cdiv(rank, meta["BLOCK_R"]), splits)

    launch(_grad_factor_kernel, grid,
        a, b, m, alpha if alpha is not None else out, out, db,
        n_tokens, d_dim, rank, token_bucket(n_tokens), per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), *m_strides,
        out.stride(0), out.stride(1), out.stride(2), db.stride(0), db.stride(1),
        HAS_MASK=mask is not None, SCALE_BY_STUDENT=alpha is not None,
        SUM_A=grad_bias is not None, DOT_PRECISION=dot_precision(a.dtype),
    )
    if splits == 1:
        return out[0]
    if grad_bias is not None:
        grad_bias.copy_(db.sum(0))
    return out.sum(0).to(a.dtype)


def _grad_x(g, v, mask_v, grad_y, teacher_weight, alpha):
    """``g @ Vm.T`` plus ``alpha * grad_y @ teacher_weight`` when a teacher is given."""
    n_tokens, rank = g.shape
    in_features = v.shape[0]
    out_features = grad_y.shape[1]
    dx = torch.empty((n_tokens, in_features), dtype=g.dtype, device=g.device)
    mv, mv_strides = mask_arg(mask_v, v)
    has_teacher = teacher_weight is not None
    w = teacher_weight if has_teacher else dx

    def grid(meta):
        return (cdiv(n_tokens, meta["BLOCK_M"]), cdiv(in_features, meta["BLOCK_N"]))

    launch(_grad_x_kernel, grid,
        g, v, mv, grad_y, w, alpha if has_teacher else dx, dx,
        n_tokens, in_features, out_features, rank, token_bucket(n_tokens),
        g.stride(0), g.stride(1), v.stride(0), v.stride(1), *mv_strides,
        grad_y.stride(0), grad_y.stride(1), w.stride(0), w.stride(1),
        dx.stride(0), dx.stride(1),
        HAS_MASK_V=mask_v is not None, HAS_TEACHER=has_teacher,
        DOT_PRECISION=dot_precision(g.dtype),
    )
    return dx


def lowrank_backward(grad_y, x, u, v, mask_u, mask_v, has_bias, teacher_weight=None,
                     alpha=None, folded_weight=None):
    """Shared by the plain (alpha None: s = 1, no teacher) and the blended backward; with the
    blend's ``folded_weight`` W [out, in] (blended_lowrank.fold), grad_x = grad_y·W."""
    t = _rank_project(x, v, mask_v, None)
    g = _rank_project(grad_y, u, mask_u, alpha)
    if folded_weight is not None:
        grad_x = grad_y @ folded_weight
    else:
        grad_x = _grad_x(g, v, mask_v, grad_y, teacher_weight, alpha)
    grad_b = (torch.empty(u.shape[0], dtype=x.dtype, device=x.device) if has_bias
              else x.new_empty(0))
    grad_u = _grad_factor(grad_y, t, mask_u, alpha, grad_b if has_bias else None)
    grad_v = _grad_factor(x, g, mask_v, None, None)
    return grad_x, grad_u, grad_v, grad_b


def backward(grad_y, x, u, v, mask_u, mask_v, has_bias):
    return lowrank_backward(grad_y, x, u, v, mask_u, mask_v, has_bias)
