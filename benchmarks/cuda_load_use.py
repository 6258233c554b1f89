"""Static check of the CUDA C++ mainloop's prefetch, no GPU needed: in the sm_90 SASS of each
kernel of csrc/lowrank_cuda.cu, how many of the 16-byte tile loads (LDG.E.128) and 8-byte
mask loads (LDG.E.64) have their registers read before the next tensor-core (HMMA) or FMA
instruction, in program order.

The mainloop fetches K tile t+1 into registers while the tensor cores multiply tile t. A
load whose registers are read before that multiply makes the warp wait for it there: the
prefetch then hides nothing. The prologue's loads (tile 0, stored before the first multiply)
are read early by design. Seen (nvcc 13.0, sm_90): before the masks moved to the store, every
load of every kernel was read before the multiply (16 of 16 in each GEMM kernel, 32 of 32 in
each fused forward); after, none in the GEMM kernels, and in the fused forward only its two
mainloops' prologues (16 of 32).

    python benchmarks/cuda_load_use.py [--arch 90]

Needs nvcc and cuobjdump (the CUDA toolkit's, or ``pip install nvidia-cuda-cuobjdump``:
found on PATH or in that package). The path followed after a load falls through conditional
branches and takes unconditional ones: a proxy; read the SASS (``--keep DIR``) where a count
surprises.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile

import torch.utils.cpp_extension as cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LOAD = re.compile(r"LDG\.E\.(128|64)\s+R(\d+)")
COMPUTE = re.compile(r"^(@!?P\d+\s+)?(HMMA|FFMA)")


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import site

    for root in site.getsitepackages():
        hits = glob.glob(os.path.join(root, "nvidia", "*", "bin", "cuobjdump"))
        if hits:
            return hits[0]
    raise SystemExit("cuobjdump not found: install the CUDA toolkit's, or `pip install nvidia-cuda-cuobjdump`")


def compile_sass(arch: str, workdir: str) -> str:
    cubin = os.path.join(workdir, "lowrank_cuda.cubin")
    includes = [f"-I{p}" for p in cpp.include_paths(device_type="cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
    subprocess.run(["nvcc", "-DTUNECOMP_WITH_CUDA", *includes, "-D__CUDA_NO_HALF_OPERATORS__",
                    "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-O3", f"-arch=sm_{arch}",
                    "-std=c++20", "-cubin", "-o", cubin, os.path.join(ROOT, "csrc", "lowrank_cuda.cu")],
                   check=True)
    return subprocess.run([cuobjdump(), "-sass", cubin], check=True, capture_output=True, text=True).stdout


def kernels(sass: str) -> dict:
    """{kernel name: [(address, instruction text)]} in program order."""
    out, current = {}, None
    for line in sass.splitlines():
        if "Function :" in line:
            current = line.split("Function :")[1].strip()
            out[current] = []
        elif current is not None:
            m = INSTRUCTION.search(line)
            if m:
                out[current].append((int(m.group(1), 16), m.group(2)))
    return out


def read_before_compute(instructions: list, i: int, registers: set) -> bool:
    """Whether the path after instruction i reads one of ``registers`` before the next
    multiply. The path falls through conditional branches and follows unconditional ones
    (the code after a ``BRA`` is another path, which may reuse the registers)."""
    where = {address: k for k, (address, _) in enumerate(instructions)}
    k = i + 1
    for _ in range(5000):  # a bound: the path may loop
        if k >= len(instructions):
            return False
        text = instructions[k][1]
        if COMPUTE.match(text):
            return False
        fields = [f.strip() for f in text.split(None, 1)[-1].split(",")]
        opcode = text.split()[1] if text.startswith("@") else text.split()[0]
        if opcode == "BRA" and not text.startswith("@"):
            k = where.get(int(fields[0].split()[-1], 16), len(instructions))
            continue
        sources = fields if opcode.startswith(("ST", "BRA", "BAR")) else fields[1:]
        if any(set(re.findall(r"\bR(\d+)\b", f)) & registers for f in sources):
            return True
        if not opcode.startswith("ST") and set(re.findall(r"\bR(\d+)\b", fields[0])) & registers:
            return False  # overwritten first
        k += 1
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="SM version to compile for (default: 90)")
    parser.add_argument("--keep", default=None, help="also write the SASS to this directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        sass = compile_sass(args.arch, workdir)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        with open(os.path.join(args.keep, f"lowrank_cuda.sm_{args.arch}.sass"), "w") as f:
            f.write(sass)
    print(f"{'kernel':<60} {'loads':>5} {'read before the multiply':>25}")
    for name, instructions in kernels(sass).items():
        loads = early = 0
        for i, (_, text) in enumerate(instructions):
            m = LOAD.search(text)
            if m:
                width = 4 if m.group(1) == "128" else 2
                loads += 1
                early += read_before_compute(instructions, i, {str(int(m.group(2)) + k) for k in range(width)})
        short = re.sub(r"^_ZN8tunecomp12cuda_kernels\d+", "", name)[:60]
        print(f"{short:<60} {loads:>5} {early:>25}")


if __name__ == "__main__":
    main()
