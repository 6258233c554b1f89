"""Where the masked forward's time goes on a GPU, in one short run (an earlier version with
fewer cases took about 30 s on an H200, most of it compiling and autotuning Triton configs):

1. CUDA-event times (``triton.testing.do_bench``) of dense ``F.linear``, the eager masked math
   (``bench_kernels.eager_masked``, the kernel benchmarks' baseline),
   the ``torch``, ``triton`` and ``cuda`` backends through ``ops.masked_lowrank_linear``, and
   the forward done as two Triton launches (``T = x·Vm`` stored, then ``T·Umᵀ``: the
   backward's ``_rank_project`` kernel, no bias), folded (``Um·Vmᵀ`` then one dense GEMM, the
   masking not timed), and the fused Triton forward on factors
   masked beforehand (no masks to load), timed without and with the two ``torch.where`` that
   mask them, on ViT-B/16 layer shapes in bf16;
2. the host time per call at 197 tokens, the GPU left to run behind: the launch overhead;
   and per forward+backward, through the public op and through the custom op directly;
   then the GPU time per call of dense, eager and each backend replayed in a CUDA graph
   (host out of the way), at 197 tokens and at the first shape's, and the cuda backend in
   fp16 beside its bf16 (the SASS of the two differs: ``benchmarks/cuda_sass.py``);
3. every Triton forward config on its own (autotuning bypassed) on the first shape, on masked
   factors and on factors masked beforehand, and beside them the earlier list's pick
   (``EARLIER_PICKS``);
4. the torch and triton backends at ranks 320 and 307, the same T chunks, only 320 with
   16-element aligned factor rows (``ALIGNMENT_RANKS``);
5. the blend (alpha = 0.5) at ``BLEND_SHAPES``, forward (and forward+backward on the first
   shape): the teacher's dense GEMM alone, the eager blend (``bench_kernels.eager_blended``),
   the backends (each folds the student into the teacher's weight at these token counts:
   ``ops.folding_pays``), Triton's fused two-branch kernel, and the fold alone (Triton's
   kernel; torch's ``where`` + ``addmm``). Run second, after section 1.

    python benchmarks/profile_forward.py [--out-dir DIR]

Prints each row as it comes; writes ``DIR/profile-<device>-<date>.json`` with the device and
versions, again after each section, so a run stopped by its time cap keeps what it measured.
A diagnosis aid, not a benchmark: no targets, one process, no pairing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from bench_kernels import eager_blended
from bench_kernels import eager_masked as eager  # the kernel benchmarks' eager baseline
from report import slug
from tunecomp import ops, provenance, reference
from tunecomp.kernels import blended_lowrank, masked_lowrank

DTYPE = torch.bfloat16
RANK = 192
SHAPES = ((768, 768, 12608), (3072, 768, 12608), (768, 3072, 50432))  # (in, out, tokens)


# Rank alignment: 307 (ViT-B/16's MLP at half the parameters) against 320, both held as T
# chunks 256 + 64; only 320 gives factor rows Triton can prove 16-element aligned.
ALIGNMENT_SHAPE, ALIGNMENT_RANKS = (768, 3072, 12608), (320, 307)


BLEND_SHAPES = ((768, 768, 12608), (768, 3072, 12608))


def layer(in_features, out_features, n_tokens, seed=0, rank=RANK, device="cuda", dtype=DTYPE):
    """The op's inputs (x, u, v, bias, masks keeping half), random from ``seed``."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    return dict(
        x=randn(n_tokens, in_features),
        u=randn(out_features, rank, scale=0.1),
        v=randn(in_features, rank, scale=0.1),
        bias=randn(out_features),
        mask_u=torch.rand(out_features, rank, device=device, generator=g) > 0.5,
        mask_v=torch.rand(in_features, rank, device=device, generator=g) > 0.5,
    )


def rank_alignment() -> list:
    """Times of the torch and triton backends at ranks 320 and 307 (ALIGNMENT_SHAPE)."""
    rows = []
    for rank in ALIGNMENT_RANKS:
        a = layer(*ALIGNMENT_SHAPE, rank=rank)
        row = {"shape": "{}->{} n={}".format(*ALIGNMENT_SHAPE) + f" r={rank}"}
        time_into(row, {b: (lambda b=b: ops.masked_lowrank_linear(**a, backend=b)) for b in ("torch", "triton")})
        rows.append(row)
        print(row, flush=True)
    return rows


def time_into(row: dict, cases: dict, suffix: str = "_us", bench=do_bench) -> None:
    """``row[name + suffix]``: each case's CUDA-event time in µs, or the error it raised."""
    for name, fn in cases.items():
        try:
            row[name + suffix] = round(bench(fn) * 1e3, 1)
        except Exception as error:  # a backend missing here still leaves the others' times
            row[name + suffix] = f"{type(error).__name__}: {error}"[:200]


def blend_times(in_features, out_features, n_tokens, backward=True) -> dict:
    """Section 5: the blend's forward (``*_us``) and forward+backward (``*_fwd_bwd_us``, where
    ``backward``: the Triton backward autotunes four kernels per shape, tens of seconds)."""
    a = layer(in_features, out_features, n_tokens)
    g = torch.Generator(device="cuda").manual_seed(1)
    w0 = (torch.randn(out_features, in_features, device="cuda", generator=g) * 0.03).to(DTYPE)
    b0 = torch.randn(out_features, device="cuda", generator=g).to(DTYPE)
    alpha = torch.tensor(0.5, device="cuda")
    teacher = (w0, b0, alpha)
    lowrank = (a["x"], a["u"], a["v"], a["bias"], a["mask_u"], a["mask_v"])
    factors = (a["u"], a["v"], a["mask_u"], a["mask_v"])
    a16, s16 = reference.blend_scales(alpha, DTYPE)
    forward = {
        "teacher_dense": lambda: F.linear(a["x"], w0, b0),
        "eager": lambda: eager_blended(*lowrank, *teacher),
        "torch": lambda: ops.blended_lowrank_linear(*lowrank, *teacher, backend="torch"),
        "triton": lambda: ops.blended_lowrank_linear(*lowrank, *teacher, backend="triton"),
        "cuda": lambda: ops.blended_lowrank_linear(*lowrank, *teacher, backend="cuda"),
        "triton_two_branch": lambda: blended_lowrank.two_branch_forward(*lowrank, *teacher),
        "fold_triton": lambda: blended_lowrank.fold(*factors, w0, alpha, a["bias"], b0),
        "fold_torch": lambda: ops._folded_weight(
            reference.apply_mask(a["u"], a["mask_u"]), reference.apply_mask(a["v"], a["mask_v"]),
            w0, a16, s16),
    }
    row = {"shape": f"{in_features}->{out_features} n={n_tokens} r={RANK} alpha=0.5"}
    time_into(row, forward)
    if not backward:
        return row
    x = a["x"].clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in (a["u"], a["v"], a["bias"])]
    grad_y = torch.randn(n_tokens, out_features, device="cuda", dtype=DTYPE)
    args = (x, params[0], params[1], params[2], a["mask_u"], a["mask_v"], *teacher)
    training = {
        "eager": lambda: eager_blended(*args),
        **{b: (lambda b=b: ops.blended_lowrank_linear(*args, backend=b))
           for b in ("torch", "triton", "cuda")},
    }
    time_into(row, {name: (lambda f=fn: f().backward(grad_y)) for name, fn in training.items()},
              "_fwd_bwd_us")
    return row


def training_host_us(a) -> dict:
    """Section 2, with gradients: host time of one forward+backward, eager math against the
    backend "torch" through the public op (eagerly an autograd.Function) and through the
    custom op that torch.compile sees (its autograd wrapper: the route eager calls took
    before)."""
    leaves = {k: (t.detach().requires_grad_() if k in ("x", "u", "v", "bias") else t) for k, t in a.items()}
    args = [leaves[k] for k in ("x", "u", "v", "bias", "mask_u", "mask_v")]
    calls = {
        "eager": lambda: eager(**leaves),
        "ops_torch": lambda: ops.masked_lowrank_linear(*args, backend="torch"),
        "custom_op_torch": lambda: torch.ops.tunecomp.masked_lowrank_linear(*args, "torch"),
    }
    return {name: host_us(lambda f=fn: f().sum().backward()) for name, fn in calls.items()}


def in_graph_us() -> list:
    """Section 2b: GPU time per call with the host out of the way (``do_bench_cudagraph``:
    calls captured in a CUDA graph, replayed). Beside section 1's times, which include the
    host's where it cannot keep the GPU busy, this says whether a small call is slow on the
    GPU or on the host."""
    rows = []
    for n_tokens in (197, SHAPES[0][2]):
        a = layer(SHAPES[0][0], SHAPES[0][1], n_tokens)
        weight = torch.randn(SHAPES[0][1], SHAPES[0][0], device="cuda", dtype=DTYPE)
        cases = {"dense": lambda: F.linear(a["x"], weight, a["bias"]), "eager": lambda: eager(**a)}
        for backend in ("torch", "triton", "cuda"):
            cases[backend] = lambda b=backend: ops.masked_lowrank_linear(**a, backend=b)
        # the cuda backend's kernels in fp16 too: nvcc 13 loads their bf16 tensor-core tiles
        # with generic loads and transposes, the fp16 ones with ldmatrix (cuda_sass.py)
        half = {k: t.half() if t.is_floating_point() else t for k, t in a.items()}
        cases["cuda_fp16"] = lambda: ops.masked_lowrank_linear(**half, backend="cuda")
        row = {"shape": f"{SHAPES[0][0]}->{SHAPES[0][1]} n={n_tokens} r={RANK}"}
        time_into(row, cases, bench=do_bench_cudagraph)
        rows.append(row)
        print("in a CUDA graph:", row, flush=True)
    return rows


def two_launches(x, u, v, bias, mask_u, mask_v):
    t = masked_lowrank._rank_project(x, v, mask_v, None)
    return masked_lowrank._rank_project(t, u.T, mask_u.T, None)


def host_us(fn, calls=300):
    """Host time per call while the GPU runs behind (launch overhead, not GPU time)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    per_call = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return round(per_call, 1)


def shape_times(in_features, out_features, n_tokens) -> dict:
    a = layer(in_features, out_features, n_tokens)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=DTYPE)
    u_m, v_m = torch.where(a["mask_u"], a["u"], 0.0), torch.where(a["mask_v"], a["v"], 0.0)
    cases = {
        "dense": lambda: F.linear(a["x"], weight, a["bias"]),
        "eager": lambda: eager(**a),
        "torch": lambda: ops.masked_lowrank_linear(**a, backend="torch"),
        "triton": lambda: ops.masked_lowrank_linear(**a, backend="triton"),
        "cuda": lambda: ops.masked_lowrank_linear(**a, backend="cuda"),
        "triton_two_launches_no_bias": lambda: two_launches(**a),
        # the plain op folded like the blend (ops.folding_pays): Um·Vmᵀ, then one dense GEMM;
        # twice the FLOPs of the rank-r chain at half the parameters, but cuBLAS-shaped
        "torch_folded": lambda: F.linear(a["x"], u_m @ v_m.T, a["bias"]),
        # the fused kernel with the masks applied beforehand (not timed): what mask-on-load costs
        "triton_premasked": lambda: masked_lowrank.forward(a["x"], u_m, v_m, a["bias"], None, None),
        # ... and with the masking timed too: the alternative to mask-on-load
        "triton_where_then_fused": lambda: masked_lowrank.forward(
            a["x"], torch.where(a["mask_u"], a["u"], 0.0), torch.where(a["mask_v"], a["v"], 0.0),
            a["bias"], None, None),
    }
    row = {"shape": f"{in_features}->{out_features} n={n_tokens} r={RANK}"}
    time_into(row, cases)
    row["triton_autotuned_config"] = str(masked_lowrank._forward_kernel.best_config)
    return row


# Configs timed beside the current list: the autotuner's pick of the list before it (on an H200
# at the first shape, masked: 170 us), single-buffered where the factors are masked.
EARLIER_PICKS = (masked_lowrank._cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, OUT_TILES=16,
                                     num_warps=8, num_stages=2),)


def each_forward_config(in_features, out_features, n_tokens) -> list:
    """Each config on its own, on masked factors and on the same factors masked beforehand."""
    a = layer(in_features, out_features, n_tokens)
    premasked = dict(a, u=torch.where(a["mask_u"], a["u"], 0.0),
                     v=torch.where(a["mask_v"], a["v"], 0.0), mask_u=None, mask_v=None)
    kernel = masked_lowrank._forward_kernel
    tuned = list(kernel.configs)
    rows = []
    try:
        for config in tuned + list(EARLIER_PICKS):
            kernel.configs = [config]
            kernel.cache.clear()
            row = {"config": str(config), "in_list": config in tuned}
            for name, args in (("masked_us", a), ("premasked_us", premasked)):
                try:
                    row[name] = round(do_bench(lambda: masked_lowrank.forward(**args)) * 1e3, 1)
                except Exception as error:  # OutOfResources: the config does not fit
                    row[name] = type(error).__name__
            rows.append(row)
            print(rows[-1], flush=True)
    finally:
        kernel.configs = tuned
        kernel.cache.clear()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=".", help="where the JSON goes (default: .)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    result = {"device": provenance.device_name("cuda"), **provenance.versions(),
              "date": datetime.date.today().isoformat(),
              "command": "python benchmarks/profile_forward.py", "dtype": str(DTYPE),
              "shapes": [], "blend": [], "forward_configs": [], "host_us_per_call_n197": {},
              "rank_alignment": []}
    path = os.path.join(args.out_dir, f"profile-{slug(result['device'])}-{result['date']}.json")

    def save():  # after every section: a run cut short keeps what it measured
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    for shape in SHAPES:
        result["shapes"].append(shape_times(*shape))
        print(result["shapes"][-1], flush=True)
        save()
    for shape in BLEND_SHAPES:  # forward+backward on the first shape only
        result["blend"].append(blend_times(*shape, backward=shape == BLEND_SHAPES[0]))
        print(result["blend"][-1], flush=True)
        save()
    a = layer(768, 768, 197)
    host = {"eager": host_us(lambda: eager(**a)),
            "triton_launch_alone": host_us(lambda: masked_lowrank.forward(**a))}
    for backend in ("torch", "triton", "cuda"):
        try:
            host[backend] = host_us(lambda b=backend: ops.masked_lowrank_linear(**a, backend=b))
        except Exception as error:  # a backend missing here still leaves the others' times
            host[backend] = f"{type(error).__name__}: {error}"[:200]
    result["host_us_per_call_n197"] = host
    print("host µs per call, 197 tokens:", host, flush=True)
    result["host_us_per_training_call_n197"] = training_host_us(a)
    print("host µs per forward+backward, 197 tokens:", result["host_us_per_training_call_n197"], flush=True)
    save()
    result["in_graph"] = in_graph_us()
    save()
    result["forward_configs"] = each_forward_config(*SHAPES[0])
    save()
    result["rank_alignment"] = rank_alignment()
    save()
    print("wrote", path)

if __name__ == "__main__":
    main()
