"""One forward + backward of each op (masked and blended) on each GPU backend (triton, cuda)
at a small, awkward shape.

The workload ``gpu_check.sh`` runs under ``compute-sanitizer --tool memcheck`` (both backends)
and ``--tool racecheck`` (the CUDA C++ kernels: ``--backends cuda``): no size is a multiple
of a tile, so every kernel's edge masking is exercised; 301 tokens send the CUDA backend's
factor gradients through its split-K path, and 64 x (SM count) + 37 tokens its forward
through the fused kernel (T in shared memory) and both backends' factor gradients through
their token split (fp32 partial sums), at rank 20 and at rank 192, whose T tile
needs more than the default 48 KB of shared memory per block (the opt-in path); one fp32
case takes the kernels' FMA paths. Run it with ``TUNECOMP_TRITON_ONE_CONFIG=1`` (one
config per Triton kernel: no autotuning, whose timing launches memcheck would slow by orders
of magnitude), once without the sanitizer first so that the kernels are compiled into
Triton's disk cache, which the sanitized run reuses. Run the sanitized one with
``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own allocation and an
out-of-bounds access is not hidden inside a cached block.

Also checks the results against ``tunecomp.reference`` in float64 (loosely: this is not the
test suite) so that a kernel that silently skips work does not pass. Exit code 0 = all ran
and matched; no CUDA = nothing to check (exit 0, says so).
"""

from __future__ import annotations

import argparse
import sys

import torch

from tunecomp import ops, reference

N, IN, OUT, RANK = 301, 72, 100, 20
DTYPE = torch.bfloat16
TOLERANCE = 3e-2  # relative error in bf16 with fp32 accumulation is ~1e-2 at most here


def cases(many):
    """(tokens, rank, dtype) of every run; ``many`` = 64 x SMs + 37 tokens."""
    return ((N, RANK, DTYPE), (many, RANK, DTYPE), (many, 192, DTYPE), (N, RANK, torch.float32))


def rel_error(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run(op: str, backend_name: str, n: int = N, device="cuda", dtype=DTYPE, rank: int = RANK) -> list:
    """[(name, relative error vs the float64 reference)] for y and every gradient."""

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float64)

    x, u, v, bias = randn(n, IN), randn(OUT, rank) / rank ** 0.5, randn(IN, rank) / IN ** 0.5, randn(OUT)
    mask_u = torch.rand(OUT, rank, device=device) < 0.5
    mask_v = torch.rand(IN, rank, device=device) < 0.5
    teacher = (randn(OUT, IN) / IN ** 0.5, randn(OUT), torch.tensor(0.6, device=device))
    grad_y = randn(n, OUT)

    def forward(backend, x, u, v, bias):
        if op == "masked":
            fn = reference.masked_lowrank_linear if backend is None else ops.masked_lowrank_linear
            extra = ()
        else:
            fn = reference.blended_lowrank_linear if backend is None else ops.blended_lowrank_linear
            w0, b0, alpha = teacher
            extra = (w0.to(x.dtype), b0.to(x.dtype), alpha)
        kwargs = {} if backend is None else {"backend": backend}
        return fn(x, u, v, bias, mask_u, mask_v, *extra, **kwargs)

    results = []
    for backend, run_dtype in ((None, torch.float64), (backend_name, dtype)):
        leaves = [t.to(run_dtype).requires_grad_() for t in (x, u, v, bias)]
        y = forward(backend, *leaves)
        grads = torch.autograd.grad(y, leaves, grad_y.to(run_dtype))
        results.append([y.detach(), *grads])
    names = ("y", "grad_x", "grad_u", "grad_v", "grad_bias")
    return [(name, rel_error(got, want)) for name, want, got in zip(names, *results)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="triton,cuda", help="comma-separated GPU backends")
    parser.add_argument("--require-cuda", action="store_true",
                        help="no CUDA device is a failure (under compute-sanitizer: a CUDA start-up it broke)")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if not torch.cuda.is_available():
        print("sanitize_kernels: no CUDA device, nothing to check")
        return 1 if args.require_cuda else 0
    failed = False
    for backend in backends:
        reason = ops.available_backends("cuda", DTYPE)[backend]
        if reason is not None:
            print(f"sanitize_kernels: the {backend} backend is unavailable: {reason}")
            failed = True
            continue
        torch.manual_seed(0)
        many = 64 * torch.cuda.get_device_properties(0).multi_processor_count + 37
        for n, rank, dtype in cases(many):
            for op in ("masked", "blended"):
                for name, error in run(op, backend, n, dtype=dtype, rank=rank):
                    ok = error < TOLERANCE  # also False for NaN
                    failed |= not ok
                    print(f"{backend:7s} N={n:<6d} r={rank:<4d} {str(dtype)[6:]:9s} {op:8s} {name:10s} "
                          f"rel. error {error:.2e} {'ok' if ok else 'TOO LARGE'}")
    print(f"sanitize_kernels: {'FAILED' if failed else 'ok'} ({','.join(backends)}; "
          f"(N, rank, dtype) in {cases('64*SMs+37')}, {IN}->{OUT})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
