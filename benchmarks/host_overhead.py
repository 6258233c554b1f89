"""Host time of the Triton backend's launches, measured without a GPU.

    python benchmarks/host_overhead.py [--tokens 197] [--rank 192] [--reps 300]

The kernels are compiled for cuda:90 under kernel_resources' stand-in driver (it names the
target, it cannot launch), and each compiled kernel's launcher is replaced by a Python no-op.
So what is timed is the host code of one call up to the launch: the op wrapper, the
autotuner and Triton's JIT dispatch, with a bf16 768->768 layer of ViT-B/16 (half of each
mask kept). Autotuning is replaced by taking the first config the pruning keeps; which
config runs does not change the host path.

Three routes, alternated in one process: ``kernel[grid](...)`` (through ``Autotuner.run`` and
``JITFunction.run`` every call); past the autotuner only (``masked_lowrank.launch`` before its
direct way: the autotuner's cached pick through ``JITFunction.run``); and ``launch`` (straight
to the compiled kernel's launcher once a call like it was seen). Printed, not written:
benchmarks/KERNEL_LOG.md ("Host time") quotes it. Not the GPU host's numbers: its CPU, the
C launcher and the driver add their own; this measures the Python part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import kernel_resources  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--rank", type=int, default=192)
    parser.add_argument("--reps", type=int, default=300, help="calls per timed batch (12 batches per route)")
    args = parser.parse_args(argv)
    kernel_resources.stub_launches(lambda kernel, args: None, pick=lambda configs: configs[0])
    from tunecomp.kernels import blended_lowrank, masked_lowrank

    torch.manual_seed(0)
    n, d, r, dt = args.tokens, 768, args.rank, torch.bfloat16
    x, gy = torch.randn(n, d, dtype=dt), torch.randn(n, d, dtype=dt)
    u, v, b = torch.randn(d, r, dtype=dt), torch.randn(d, r, dtype=dt), torch.randn(d, dtype=dt)
    mu, mv = torch.rand(d, r) > 0.5, torch.rand(d, r) > 0.5
    w0, a = torch.randn(d, d, dtype=dt), torch.tensor(0.6)
    calls = {
        "forward (1 launch)": lambda: masked_lowrank.forward(x, u, v, b, mu, mv),
        "backward (5 launches)": lambda: masked_lowrank.backward(gy, x, u, v, mu, mv, True),
        "blend fold (1 launch)": lambda: blended_lowrank.fold(u, v, mu, mv, w0, a, b, b),
    }
    launch = masked_lowrank.launch
    routes = {"kernel[grid]": lambda kernel, grid, *a, **k: kernel[grid](*a, **k),
              "past autotuner": lambda kernel, grid, *a, **k: masked_lowrank._launch_tuned(kernel, grid, None, a, k),
              "launch": launch}
    print(f"host µs per call (launcher stubbed), {n} tokens, 768->768, rank {r}, bf16; "
          f"torch {torch.__version__}, triton {__import__('triton').__version__}")
    print(f"| call | {' | '.join(routes)} | saved by launch |\n|---|---|---|---|---|")
    try:
        for name, call in calls.items():
            call()  # compiles
            times = {route: [] for route in routes}
            for batch in range(12):
                for route in (routes if batch % 2 else reversed(list(routes))):
                    masked_lowrank.launch = blended_lowrank.launch = routes[route]
                    start = time.perf_counter()
                    for _ in range(args.reps):
                        call()
                    times[route].append((time.perf_counter() - start) / args.reps * 1e6)
            med = {route: statistics.median(t) for route, t in times.items()}
            old, new = med["kernel[grid]"], med["launch"]
            cells = " | ".join(f"{med[route]:.1f}" for route in routes)
            print(f"| {name} | {cells} | {old - new:.1f} ({old / new:.2f}x) |", flush=True)
    finally:
        masked_lowrank.launch = blended_lowrank.launch = launch


if __name__ == "__main__":
    main()
