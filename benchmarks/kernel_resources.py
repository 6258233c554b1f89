"""What the compilers made of tunecomp's GPU kernels, read without a GPU: registers, spilled
bytes and shared memory of every Triton autotune config, and of the CUDA C++ kernels in the
built ``tunecomp._C``.

    python benchmarks/kernel_resources.py [--target cuda:90] [--ranks 32,64,128,192,256,307,384]
        [--dtypes bfloat16,float16,float32] [--out-dir DIR] [--print] [--quick] [--no-write]
        [--forward-only]

Triton: the op wrappers (forward, backward, blended forward and backward) are called on CPU
tensors of ViT-B/16 layer shapes, with each kernel launch replaced by a compile of every config
the autotuner would try (its own pruning, then ``JITFunction.warmup``), under a stand-in Triton
driver that only names the target. So the arguments, their specialisation (dtypes, 16-byte
alignment, unit strides) and the pruned config list are those of a real call; nothing runs.
The factor gradients are compiled both whole and split over tokens (fp32 partial sums, rows
"(token split)"), with the SM count of the target's data-centre GPU.
Resource usage is read from each cubin with the cuobjdump that Triton ships, and the PTX says
which matrix instructions the dots became.

CUDA C++: the same cuobjdump on the sm_<arch> code of the built extension (skipped, and said
so, when ``tunecomp._C`` was built without CUDA).

What it tells before any GPU time is spent: that every Triton kernel compiles for the target
with this Triton; which configs spill (``local`` > 0: slow, autotuning will pass them over)
and which need more shared memory than the device has (they would fail to launch: autotuning
skips them, a config forced by hand would raise). Not timing.

Writes ``DIR/resources-<target>-triton<version>.{json,md}`` (default DIR: benchmarks/results)
with the Triton, torch and CUDA versions and the date. Exit code 1 if a kernel fails to
compile, if a call has no config that fits the shared memory (``--max-shared``, default the
target's opt-in limit per block), or if a CUDA build of ``tunecomp._C`` lacks the target's
kernels. ``--quick`` compiles one rank, one shape and bf16 only (the CI test);
``--forward-only`` the two forward kernels only, on one shape (the CI test of the largest
rank they take). Must run with
``TRITON_INTERPRET`` unset: the interpreter compiles nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import types

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))

# Opt-in shared memory per block, bytes (CUDA programming guide, compute capabilities table).
MAX_SHARED = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
# SMs of the target's data-centre GPU (A100; H100/H200 SXM), for the factor gradients' token
# split (masked_lowrank.tokens_per_split); 132 for any other arch.
SM_COUNT = {80: 108, 90: 132}
LAYERS = ((768, 2304), (768, 768), (768, 3072), (3072, 768))  # ViT-B/16 (in, out): qkv, proj, fc1, fc2
KERNELS = (  # module.attribute of every autotuned Triton kernel
    "masked_lowrank._forward_kernel",
    "masked_lowrank._rank_project_kernel",  # backward: T = x Vm and G = s dy Um
    "masked_lowrank._grad_x_kernel",
    "masked_lowrank._grad_factor_kernel",  # dU, dV (and db)
    "blended_lowrank._blended_forward_kernel",
    "blended_lowrank._fold_kernel",  # the blend's W = a·W0 + s·Um·Vmᵀ
)


class _TargetOnlyDriver:
    """Enough of a Triton driver for ``warmup``: it names the target; it cannot launch."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def stub_launches(on_launch, pick) -> None:
    """For host-side checks and timings without a GPU: compile for sm_90 under the stand-in
    driver, make each compiled kernel's launcher call ``on_launch(kernel, args)`` instead of
    launching, and make autotuning pick ``pick(configs)`` without timing anything."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    stand_in = _TargetOnlyDriver(GPUTarget("cuda", 90, 32))
    stand_in.utils = types.SimpleNamespace(unload_module=lambda module: None)  # a dropped kernel
    driver.set_active(stand_in)

    def init_handles(self):
        if self.module is None:
            self.module, self.function = 1, 0
            self._run = lambda *args, _kernel=self: on_launch(_kernel, args)

    CompiledKernel._init_handles = init_handles
    Autotuner._bench = lambda self, *args, config, **kwargs: [0.0 if config is pick(self.configs) else 1.0]


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"cuobjdump not found at {path} (it ships with Triton's NVIDIA backend)")
    return path


def res_usage(path: str):
    """(arch, function, {"registers", "local" (stack + local bytes per thread), "shared"}) for
    every kernel in the cubin or library at path, from ``cuobjdump -res-usage``."""
    text = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True,
                          check=True).stdout
    arch = name = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("= ")[1]
        elif line.startswith("Function "):
            name = line[len("Function "):].rstrip(":")
        elif line.startswith("REG:") and name:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            yield arch, name, {"registers": int(fields["REG"]),
                               "local": int(fields["STACK"]) + int(fields["LOCAL"]),
                               "shared": int(fields["SHARED"])}


def resource_usage(cubin: bytes) -> dict:
    """{"registers", "local"} of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        found = [usage for _, _, usage in res_usage(f.name)]
    if len(found) != 1:
        raise RuntimeError(f"expected one kernel in the cubin, cuobjdump found {len(found)}")
    return {"registers": found[0]["registers"], "local": found[0]["local"]}


def matrix_instructions(ptx: str) -> str:
    """Which units the dots run on: "wgmma" (Hopper warpgroup MMA, needs 64-row tiles per
    warpgroup), "mma" (mma.sync, the pre-Hopper tensor-core path) or "fma" (no tensor cores,
    e.g. fp32 with input_precision="ieee")."""
    found = [name for name, op in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync")) if op in ptx]
    return "+".join(found) or "fma"


def pipeline_buffers(ttgir: str):
    """(the fewest buffers of any shared-memory ring the software pipeliner allocated, or None
    where it allocated none, as at 1 stage; the number of 2-D tile loads it left synchronous).
    A ring of 1 means a loop waits for each of that operand's loads before its dot, with no
    load in flight behind it: Triton gives a tile that passes through registers on its way to
    the dot (a masked factor tile: load, ``tl.where``, store to shared memory) only
    ``num_stages - 1`` buffers, so one at 2 stages. A synchronous tile load in a loop
    (``tt.load`` left in the TTGIR) waits for its data every iteration; seen where Triton
    cannot prove a tile's rows 16-element aligned (the factors of rank 307)."""
    rings = [int(n) for n in re.findall(r"local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x", ttgir)]
    sync, regions = 0, []  # regions: for each open region, whether it is a loop's body
    for line in ttgir.splitlines():
        code = line.split(" loc(")[0].strip()
        if code.startswith("}"):
            if regions:
                regions.pop()
            continue
        if any(regions) and re.search(r"= tt\.load .*: tensor<\d+x\d+x!tt\.ptr", code):
            sync += 1  # a 2-D tile loaded synchronously inside a loop
        if code.endswith("{"):
            regions.append("scf.for" in code)
    return (min(rings) if rings else None), sync


class _CompileInsteadOfLaunch:
    """Stands in for an autotuned kernel: ``kernel[grid](*args, **kwargs)`` compiles every
    config the autotuner keeps for these arguments and records the results."""

    def __init__(self, name, tuner, records, context):
        self.name, self.tuner, self.records, self.context = name, tuner, records, context

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tuner.nargs = dict(zip(self.tuner.arg_names, args))
            try:
                configs = self.tuner.prune_configs(kwargs)
            finally:
                self.tuner.nargs = None
            named = dict(zip(self.tuner.arg_names, args))
            kernel = self.name.split(".")[-1]
            if named.get("tokens_per_split", named.get("n_tokens")) != named.get("n_tokens"):
                kernel += " (token split)"  # fp32 partial sums: a binary of its own
            for config in configs:
                meta = config.all_kwargs()
                record = dict(self.context, kernel=kernel,
                              config=_config_text(meta),
                              r_pad=_rank_chunks_text(kwargs))
                try:
                    compiled = self.tuner.fn.warmup(*args, grid=grid, **kwargs, **meta)
                    record.update(resource_usage(compiled.asm["cubin"]),
                                  shared=int(compiled.metadata.shared),
                                  mma=matrix_instructions(compiled.asm["ptx"]),
                                  error=None)
                    record["buffers"], record["sync_loads"] = pipeline_buffers(compiled.asm["ttgir"])
                except Exception as exc:  # a compile error is the finding, not a crash
                    record.update(registers=None, local=None, shared=None, mma=None,
                                  buffers=None, sync_loads=None, error=f"{type(exc).__name__}: {str(exc).strip()[:400]}")
                self.records.append(record)
            return None

        return launch


def _rank_chunks_text(kwargs):
    """The forward kernels' padded rank as its chunks, e.g. "128+64" (None for the others)."""
    if "R0" not in kwargs:
        return None
    return "+".join(str(kwargs[f"R{i}"]) for i in range(kwargs["N_CHUNKS"]))


def _config_text(meta) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in meta.items() if k.isupper())
    return f"{blocks} warps={meta.get('num_warps')} stages={meta.get('num_stages')}"


def compile_all(target: str, ranks, dtypes, layers=LAYERS, log=print, forward_only: bool = False) -> list:
    """Records of every (call, config) compile; see the module docstring."""
    from tunecomp.kernels import _env_flag  # imports no Triton: the flags are read first

    if _env_flag("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    if _env_flag("TUNECOMP_TRITON_ONE_CONFIG"):
        raise SystemExit("unset TUNECOMP_TRITON_ONE_CONFIG: every config is to be compiled")
    import triton
    from triton.backends.compiler import GPUTarget

    from tunecomp.kernels import blended_lowrank, masked_lowrank

    backend, arch = target.split(":")
    driver = _TargetOnlyDriver(GPUTarget(backend, int(arch), 32))
    # The factor gradients' token split follows the SM count; CPU tensors would report the
    # interpreter's stand-in.
    sm_count = masked_lowrank._multiprocessor_count
    masked_lowrank._multiprocessor_count = lambda device: SM_COUNT.get(int(arch), 132)
    modules = {"masked_lowrank": masked_lowrank, "blended_lowrank": blended_lowrank}
    originals = {name: getattr(modules[name.split(".")[0]], name.split(".")[1]) for name in KERNELS}
    records: list = []
    context: dict = {}
    seen = set()
    triton.runtime.driver.set_active(driver)
    try:
        for name, tuner in originals.items():
            module, attr = name.split(".")
            setattr(modules[module], attr, _CompileInsteadOfLaunch(name, tuner, records, context))
        for dtype in dtypes:
            for in_f, out_f in layers:
                for rank in ranks:
                    key = (dtype, in_f, out_f, masked_lowrank.rank_pad(rank))
                    if key in seen:  # same specialisation and pruning: same binaries
                        continue
                    seen.add(key)
                    context.clear()
                    context.update(dtype=str(dtype).replace("torch.", ""), layer=f"{in_f}x{out_f}",
                                   rank=rank)
                    done = len(records)
                    with _SkipDenseMatmuls():
                        _call_every_op(masked_lowrank, blended_lowrank, dtype, in_f, out_f, rank,
                                       forward_only)
                    errors = sum(r["error"] is not None for r in records[done:])
                    log(f"{context['dtype']:8s} {in_f:4d}->{out_f:4d} rank {rank:3d}: "
                        f"{len(records) - done} compiles" + (f", {errors} FAILED" if errors else ""))
    finally:
        masked_lowrank._multiprocessor_count = sm_count
        for name, tuner in originals.items():
            module, attr = name.split(".")
            setattr(modules[module], attr, tuner)
        try:
            triton.runtime.driver.reset_active()
        except RuntimeError:  # no GPU here, so no default driver to go back to
            pass
    return records


class _SkipDenseMatmuls(TorchDispatchMode):
    """The ops' own dense matmuls (cuBLAS on a GPU: the folded blend's x·Wᵀ and grad_y·W)
    return uninitialised results of the right shape, uncomputed. Only the Triton kernels'
    compiles matter here, and no kernel is given such a result. Computed on a 2-core CPU in
    bfloat16 at 12608 tokens, they took 40 of the 45 s per shape and rank."""

    SKIPPED = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            a, b = args[-2:]
            return torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
        return func(*args, **(kwargs or {}))


def _call_every_op(masked_lowrank, blended_lowrank, dtype, in_f, out_f, rank, forward_only=False):
    """Each op once, as ops.py calls it in training: contiguous x, masks on, biases on. The
    token count picks an autotune bucket and, for the factor gradients, whether they split
    over tokens (a binary of its own): the backward runs at 256 tokens (no split) and at
    12608 (64 images; a split wherever [d, r] has fewer 64 x 64 tiles than SMs)."""
    u, v = torch.empty(out_f, rank, dtype=dtype), torch.empty(in_f, rank, dtype=dtype)
    mu, mv = torch.ones(out_f, rank, dtype=torch.bool), torch.ones(in_f, rank, dtype=torch.bool)
    bias = torch.empty(out_f, dtype=dtype)
    w0, b0 = torch.empty(out_f, in_f, dtype=dtype), torch.empty(out_f, dtype=dtype)
    alpha = torch.empty((), dtype=torch.float32)
    for n in (256, 12608):
        x = torch.empty(n, in_f, dtype=dtype)
        dy = torch.empty(n, out_f, dtype=dtype)
        if n == 256:
            masked_lowrank.forward(x, u, v, bias, mu, mv)
        # at 256 tokens the two-branch blend, at 12608 the fold (ops.folding_pays)
        blended_lowrank.blended_forward(x, u, v, bias, mu, mv, w0, b0, alpha)
        if forward_only:
            return
        masked_lowrank.backward(dy, x, u, v, mu, mv, True)
        blended_lowrank.blended_backward(dy, x, u, v, mu, mv, w0, alpha, True)


_CUDA_DTYPES = {"13__nv_bfloat16": "bfloat16", "6__half": "float16", "f": "float32"}


def cuda_kernels(arch: int):
    """Rows (kernel, dtype, registers, local, shared) of tunecomp._C's sm_<arch> kernels;
    None when the extension has no CUDA code (built without CUDA, or not built)."""
    try:
        from tunecomp import _C
    except ImportError:
        return None
    if not _C.with_cuda:
        return None
    rows = []
    for code_arch, name, usage in res_usage(_C.__file__):
        if code_arch != f"sm_{arch}":
            continue
        match = re.search(r"\d+([a-z_]+_kernel)I(\w+?)E", name)
        kernel, dtype = (match.group(1), _CUDA_DTYPES.get(match.group(2), match.group(2))) \
            if match else (name, "")
        rows.append(dict(kernel=kernel, dtype=dtype, **usage))
    return rows


def unique(records) -> list:
    """One row per distinct binary (kernel, dtype, rank chunks where they matter, config)."""
    rows, seen = [], set()
    for r in records:
        key = (r["kernel"], r["dtype"], r["r_pad"], r["config"])
        if key not in seen:
            seen.add(key)
            rows.append({k: v for k, v in r.items() if k not in ("layer", "rank")})
    return rows


def calls(records, max_shared: int) -> list:
    """Per kernel call (kernel, dtype, layer, rank): configs kept, and how many compiled,
    fit in the shared memory, and of those how many do not spill and how many also keep a
    load in flight on every operand (no single-buffered ring, no synchronous tile load)."""
    grouped: dict = {}
    for r in records:
        grouped.setdefault((r["kernel"], r["dtype"], r["layer"], r["rank"]), []).append(r)
    out = []
    for (kernel, dtype, layer, rank), rs in grouped.items():
        ok = [r for r in rs if r["error"] is None]
        fit = [r for r in ok if r["shared"] <= max_shared]
        out.append(dict(kernel=kernel, dtype=dtype, layer=layer, rank=rank, configs=len(rs),
                        compiled=len(ok), fit=len(fit), fit_no_spill=sum(not r["local"] for r in fit),
                        fit_prefetching=sum(_prefetches(r) and not r["local"] for r in fit)))
    return out


def _prefetches(record) -> bool:
    """Every tile load of the binary is pipelined with a load in flight behind it."""
    return (record["buffers"] or 0) >= 2 and record["sync_loads"] == 0


def problems(records, max_shared: int) -> list:
    """Compile errors, and calls whose every kept config exceeds the shared memory."""
    found = [f"{r['kernel']} {r['dtype']} {r['layer']} rank {r['rank']} [{r['config']}]: {r['error']}"
             for r in records if r["error"]]
    for c in calls(records, max_shared):
        if c["fit"] == 0:
            found.append(f"{c['kernel']} {c['dtype']} {c['layer']} rank {c['rank']}: no config "
                         f"compiles and fits in {max_shared} bytes of shared memory")
    return found


def markdown(meta, rows, max_shared, found, cuda_rows, calls_list) -> str:
    lines = [f"# tunecomp's GPU kernels compiled for {meta['target']} (no GPU used)", "",
             f"Triton {meta['triton']}, torch {meta['torch']} (CUDA {meta['cuda']}), "
             f"{meta['date']}, on {meta['host']}. Command: `{meta['command']}`. "
             "Written by that command, never edited by hand.", ""]
    lines += ["## CUDA C++ (tunecomp._C)", ""]
    if cuda_rows is None:
        lines += ["tunecomp._C was built without CUDA here: nothing to read.", ""]
    else:
        lines += ["Tiles are 64 x 64 x 32 with 128 threads; shared = static bytes per block as "
                  "cuobjdump counts them (on sm_90 with the 1 KiB the system reserves; the fused "
                  "forward adds its T rows as dynamic shared memory); local > 0: a stack frame "
                  "(spills or a local array).", "",
                  "| kernel | dtype | registers | local | shared |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['kernel']} | {r['dtype']} | {r['registers']} | {r['local']} | {r['shared']} |"
                  for r in cuda_rows]
        lines.append("")
    lines += ["## Triton", "",
              "One row per distinct binary. local = stack + local memory per thread in bytes "
             "(> 0: ptxas spilled registers); shared = bytes per block, the limit "
             f"is {max_shared}; mma = the matrix instructions in the PTX (wgmma: Hopper's "
             "warpgroup MMA; mma: mma.sync; fma: no tensor cores); buffers = the fewest "
             "shared-memory buffers of any operand the pipeliner prefetches (1: every step of "
             "that loop waits for its own load; a masked factor tile gets num_stages - 1; "
             "empty: nothing prefetched, 1 stage); sync = 2-D tile loads in loops the "
             "pipeliner left synchronous (each iteration waits for them); rank chunks = the "
             "column chunks the forward kernels hold T in (masked_lowrank.rank_chunks: the rank "
             "padded to a multiple of 16, as at most 3 powers of two). Configs are those the "
             "autotuner keeps after its pruning.", ""]
    if found:
        lines += ["**Problems:**", ""] + [f"- {p}" for p in found] + [""]
    else:
        lines += ["Every Triton kernel compiled; every call has a config that fits.", ""]
    spilled = sum(1 for r in rows if r["local"])
    too_big = sum(1 for r in rows if r["shared"] is not None and r["shared"] > max_shared)
    single = sum(1 for r in rows if r["error"] is None and not _prefetches(r))
    lines += [f"{len(rows)} binaries: {spilled} spill, {too_big} exceed shared memory, "
              f"{single} wait for some tile load (1 buffer, 1 stage or a synchronous load).", ""]
    exposed = sorted({f"{c['kernel']} {c['dtype']} rank {c['rank']}"
                      for c in calls_list if c["fit"] and not c["fit_prefetching"]})
    if exposed:
        lines += ["Calls whose every fitting config spills or waits for a tile load: "
                  + "; ".join(exposed) + ".", ""]
    lines += ["| kernel | dtype | rank chunks | config | registers | local | shared | mma | buffers "
              "| sync | note |", "|---|---|---|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        note = r["error"] or ("spills" if r["local"] else "")
        if r["shared"] is not None and r["shared"] > max_shared:
            note = (note + "; " if note else "") + "exceeds shared memory"
        r_pad = r["r_pad"] if r["r_pad"] is not None else ""
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r_pad} | {r['config']} | "
                     f"{r['registers'] if r['registers'] is not None else ''} | "
                     f"{r['local'] if r['local'] is not None else ''} | "
                     f"{r['shared'] if r['shared'] is not None else ''} | {r['mma'] or ''} | "
                     f"{r['buffers'] if r.get('buffers') is not None else ''} | "
                     f"{r['sync_loads'] if r.get('sync_loads') is not None else ''} | {note} |")
    return "\n".join(lines) + "\n"


def recorded_command(argv) -> str:
    """The command line that makes the results, less ``--out-dir``: where the files go does
    not change them, and a machine's path does not belong in a committed file."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--out-dir="):
            skip = False
            continue
        skip = arg == "--out-dir"
        if not skip:
            kept.append(arg)
    return " ".join(["python benchmarks/kernel_resources.py", *kept])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="cuda:90", help="backend:arch, e.g. cuda:90 (H100/H200)")
    parser.add_argument("--ranks", default="32,64,128,192,256,307,384",
                        help="192: the kernel benchmarks' rank; 307: ViT-B/16's MLP at half "
                             "the parameters, unaligned")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--max-shared", type=int, default=None,
                        help="bytes of shared memory per block (default: the target's limit)")
    parser.add_argument("--quick", action="store_true", help="rank 64, bf16, one layer shape")
    parser.add_argument("--forward-only", action="store_true", help="the forward kernels only, one layer shape")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--no-write", action="store_true", help="check only, write no files")
    parser.add_argument("--print", action="store_true", help="print the markdown table")
    args = parser.parse_args(argv)

    arch = int(args.target.split(":")[1])
    max_shared = args.max_shared or MAX_SHARED.get(arch)
    if max_shared is None:
        parser.error(f"--max-shared is needed for {args.target}: known archs {sorted(MAX_SHARED)}")
    ranks = [64] if args.quick else [int(r) for r in args.ranks.split(",")]
    dtypes = [torch.bfloat16] if args.quick else [getattr(torch, d) for d in args.dtypes.split(",")]
    layers = LAYERS[:1] if args.quick or args.forward_only else LAYERS
    start = time.perf_counter()
    records = compile_all(args.target, ranks, dtypes, layers, forward_only=args.forward_only)
    found = problems(records, max_shared)
    cuda_rows = cuda_kernels(arch)
    if cuda_rows == []:
        found.append(f"tunecomp._C was built with CUDA but has no sm_{arch} kernels "
                     "(TUNECOMP_CUDA_ARCHS)")
    import triton

    meta = dict(target=args.target, triton=triton.__version__, torch=torch.__version__,
                cuda=torch.version.cuda,
                date=datetime.date.today().isoformat(),
                host=f"{platform.machine()} {platform.system()}, Python {platform.python_version()}",
                command=recorded_command(sys.argv[1:] if argv is None else argv),
                seconds=round(time.perf_counter() - start, 1), max_shared=max_shared)
    rows = unique(records)
    calls_list = calls(records, max_shared)
    text = markdown(meta, rows, max_shared, found, cuda_rows, calls_list)
    if not args.no_write:
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, f"resources-{args.target.replace(':', '')}-triton{triton.__version__}")
        with open(stem + ".json", "w") as f:
            json.dump(dict(meta, problems=found, cuda_kernels=cuda_rows, triton_binaries=rows,
                           triton_calls=calls_list), f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(text)
        print(f"wrote {stem}.json and .md")
    if args.print:
        print(text)
    cuda_text = "no CUDA build of tunecomp._C" if cuda_rows is None else f"{len(cuda_rows)} CUDA C++ kernels"
    print(f"{len(records)} Triton kernel compiles ({len(rows)} distinct binaries) for {args.target} "
          f"in {meta['seconds']} s; {cuda_text}; {len(found)} problems")
    for p in found:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
