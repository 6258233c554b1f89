"""Where an argument error raised in tunecomp._C kills the process instead of reaching Python
(seen on an H200 machine, 2026-11-26: a segfault), tell whether it is the machine or the
extension: build three minimal torch extensions, one with tunecomp's compile flags (-O3
-fopenmp), one with none, and one linking libstdc++.so.6 by name (as setup.py does where the
compiler would put a static copy of libstdc++ in the extension; on that machine in 2026-11-27
the first two crashed), each with a function that raises through TORCH_CHECK_VALUE (a c10::ValueError,
which records a stack trace when it is made) and one that throws a plain
std::invalid_argument, and call each in a child process of its own.

    python benchmarks/raise_probe.py        # gpu_check.sh runs it where its raise-probe fails

Prints one line per variant and call: the Python exception it raised (ValueError for
TORCH_CHECK_VALUE; torch's handler turns std::invalid_argument into RuntimeError), or how the
child died; exits 1 if one died or a build failed.
If every variant crashes, the cause is in the machine's toolchain or libraries (gpu_check's
log has the linker bindings and cuda-gdb's stack); if none does, in what tunecomp._C adds
(its CUDA objects, its own code). If only the TORCH_CHECK_VALUE calls crash, it is in
recording c10::Error's stack trace, not in the throw.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

SOURCE = r"""
#include <stdexcept>
#include <torch/extension.h>

void torch_check(int64_t n) { TORCH_CHECK_VALUE(n > 0, "n must be positive; got ", n); }
void std_throw(int64_t n) { if (n <= 0) throw std::invalid_argument("n must be positive"); }
"""

# name: (compile flags, link flags). "shared_runtime" links libstdc++.so.6 by name, as
# setup.py does where the compiler driver would link libstdc++ statically.
VARIANTS = {"plain": ([], []), "tunecomp_flags": (["-O3", "-fopenmp"], ["-fopenmp"]),
            "shared_runtime": ([], ["-l:libstdc++.so.6"])}

CHILD = r"""
import sys, torch
from torch.utils.cpp_extension import load_inline
name, build, call = sys.argv[1], sys.argv[2], sys.argv[5]
cflags, ldflags = sys.argv[3].split(), sys.argv[4].split()
module = load_inline(name, cpp_sources=sys.stdin.read(), functions=["torch_check", "std_throw"],
                     extra_cflags=cflags, extra_ldflags=ldflags, build_directory=build)
if call == "build":
    raise SystemExit(0)
try:
    getattr(module, call)(-1)
except Exception as error:
    print(f"{type(error).__name__}: {error}")
else:
    print("no exception")
"""


def child(name: str, build: str, flags: tuple, call: str) -> subprocess.CompletedProcess:
    cflags, ldflags = flags
    return subprocess.run([sys.executable, "-c", CHILD, name, build, " ".join(cflags), " ".join(ldflags), call],
                          input=SOURCE, capture_output=True, text=True, timeout=240)


def outcome(done: subprocess.CompletedProcess) -> str:
    if done.returncode == 0:
        return done.stdout.strip().splitlines()[-1]
    if done.returncode < 0:
        return f"killed by {signal.Signals(-done.returncode).name}"
    return f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}"


def main() -> int:
    root = tempfile.mkdtemp(prefix="raise_probe_")
    try:
        builds = {v: os.path.join(root, v) for v in VARIANTS}
        for path in builds.values():
            os.makedirs(path)
        # Each variant compiles in its own process, all at once (one translation unit each).
        with ThreadPoolExecutor(len(VARIANTS)) as pool:
            built = dict(zip(VARIANTS, pool.map(
                lambda v: child(f"raise_probe_{v}", builds[v], VARIANTS[v], "build"), VARIANTS)))
        failed = False
        for variant, flags in VARIANTS.items():
            if built[variant].returncode != 0:
                print(f"{variant:15s} build failed: {outcome(built[variant])}")
                print(built[variant].stderr[-2000:])
                failed = True
                continue
            for call in ("torch_check", "std_throw"):
                done = child(f"raise_probe_{variant}", builds[variant], flags, call)
                failed |= done.returncode != 0
                print(f"{variant:15s} {call:12s} {outcome(done)}")
        return 1 if failed else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
