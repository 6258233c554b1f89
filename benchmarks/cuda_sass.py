"""What nvcc made of the CUDA C++ kernels, no GPU needed: per kernel of csrc/lowrank_cuda.cu
compiled for one SM version, ptxas's registers, spills and shared memory, and a count of the
SASS instructions that say whether the mainloop's pipeline is what the source means:

- LDGSTS: asynchronous global -> shared copies (cp.async), the tiles' and masks' normal path;
- LDG: synchronous global loads (the edges of the problem and odd strides, the epilogue's
  bias and addend reads): every one makes its warp wait;
- DEPBAR: waits for the cp.async groups; BAR: block barriers; HMMA: tensor-core MMAs (0 for
  fp32, which runs on the FMA units);
- LDSM: shared -> register matrix loads (ldmatrix), the usual way tensor-core operands leave
  shared memory; LDS: plain shared loads; LD: generic-address loads (a pointer the compiler
  cannot prove shared: each resolves its address space at run time); MOVM: in-register
  transposes of 8x8 tiles.

Seen (nvcc 13.0, sm_90, the 3-stage cp.async pipeline): 0 spills; 90 registers in the bf16
GEMM, 122 in the bf16 fused forward (before, with the K tile prefetched into registers: 128
and 164). 11-27: 90 and 96 registers; the fp16 kernels read their tensor-core tiles with
ldmatrix (LDSM), the bf16 ones with generic loads and transposes (0 LDSM; 350 LD and 160
MOVM in the fused forward).

    python benchmarks/cuda_sass.py [--arch 90] [--keep DIR]

Needs nvcc, cuobjdump and nvdisasm (the CUDA toolkit's, or ``pip install
nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``: found on PATH or in those packages).
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
COUNTED = {"LDGSTS": r"\bLDGSTS\b", "LDG": r"\bLDG\.", "DEPBAR": r"\bDEPBAR\b", "BAR": r"\bBAR\.SYNC\b",
           "HMMA": r"\bHMMA\b", "LDSM": r"\bLDSM\b", "LDS": r"\bLDS(?:\.|\s)", "LD": r"\bLD\.", "MOVM": r"\bMOVM\b"}
RESOURCES = re.compile(r"Compiling entry function '(\w+)'.*?Used (\d+) registers.*?(\d+) bytes smem", re.S)
SPILLS = re.compile(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores", re.S)


def tool(name: str) -> str:
    """The path of a CUDA tool: on PATH, else in its pip package (nvidia/*/bin)."""
    found = shutil.which(name)
    if found:
        return found
    import site

    for root in site.getsitepackages():
        hits = glob.glob(os.path.join(root, "nvidia", "*", "bin", name))
        if hits:
            return hits[0]
    raise SystemExit(f"{name} not found: install the CUDA toolkit's, or `pip install nvidia-cuda-{name}`")


def compile_cubin(arch: str, workdir: str) -> tuple:
    """(SASS text, ptxas's resource report)."""
    cubin = os.path.join(workdir, "lowrank_cuda.cubin")
    includes = [f"-I{p}" for p in cpp.include_paths(device_type="cuda")] + [f"-I{sysconfig.get_paths()['include']}"]
    built = subprocess.run(["nvcc", "-DTUNECOMP_WITH_CUDA", *includes, "-D__CUDA_NO_HALF_OPERATORS__",
                            "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                            "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-O3", f"-arch=sm_{arch}",
                            "-std=c++20", "-Xptxas", "-v", "-cubin", "-o", cubin,
                            os.path.join(ROOT, "csrc", "lowrank_cuda.cu")],
                           check=True, capture_output=True, text=True)
    env = dict(os.environ, NVDISASM_PATH=os.path.dirname(tool("nvdisasm")))  # cuobjdump -sass runs it
    sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], check=True, capture_output=True, text=True,
                          env=env).stdout
    return sass, built.stderr


def kernels(sass: str) -> dict:
    """{kernel name: its SASS text}."""
    parts = re.split(r"\n\s*Function : ", sass)
    return {part.split("\n", 1)[0].strip(): part for part in parts[1:]}


def short(name: str) -> str:
    return re.sub(r"^_ZN8tunecomp12cuda_kernels\d+", "", name)[:52]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="SM version to compile for (default: 90)")
    parser.add_argument("--keep", default=None, help="also write the SASS to this directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        sass, report = compile_cubin(args.arch, workdir)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        with open(os.path.join(args.keep, f"lowrank_cuda.sm_{args.arch}.sass"), "w") as f:
            f.write(sass)
    entries = [e for e in report.split("ptxas info    : Compiling entry function")[1:]]
    resources = {}
    for entry in entries:
        entry = "Compiling entry function" + entry
        m, s = RESOURCES.search(entry), SPILLS.search(entry)
        if m:
            resources[m.group(1)] = (int(m.group(2)), int(s.group(2)) if s else 0, int(m.group(3)))
    print(f"{'kernel':<52} {'regs':>4} {'spill':>5} {'smem':>6} " + " ".join(f"{k:>6}" for k in COUNTED))
    for name, text in kernels(sass).items():
        regs, spill, smem = resources.get(name, ("?", "?", "?"))
        counts = [len(re.findall(pattern, text)) for pattern in COUNTED.values()]
        print(f"{short(name):<52} {regs:>4} {spill:>5} {smem:>6} " + " ".join(f"{c:>6}" for c in counts))


if __name__ == "__main__":
    main()
