"""Builds tunecomp and its extension tunecomp._C from csrc/.

The C++ (CPU) sources are always built. The CUDA sources (csrc/*.cu) are built too when
torch is a CUDA build and nvcc is found, unless TUNECOMP_NO_CUDA=1. Target GPUs come from
TUNECOMP_CUDA_ARCHS (default "80;90": A100 and H100/H200).
"""

import glob
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import setup


def _find_cuda_home():
    """CUDA_HOME, or the toolkit folder that holds the real nvcc.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on the PATH is a
    wrapper script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc).
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _shared_cxx_runtime_flags():
    """["-l:libstdc++.so.6"] where the link would otherwise put a static copy of libstdc++ in
    the extension, else [].

    Seen on an H200 machine (2026-11-27; g++ 13, Ubuntu 24.04): writing an integer to a stream
    in the extension (every TORCH_CHECK message with a shape in it) crashed the process, inside
    _C's own copy of the stream code, and a ten-line torch extension crashed the same way. The
    dynamic linker bound neither __cxa_throw nor __gxx_personality_v0 of _C to libstdc++.so.6
    (only the unwinder's _Unwind_* to libgcc_s): signs of a static copy of libstdc++ in _C.
    Two copies of the C++ runtime in one process keep separate locale facet tables, so the
    stream called the wrong facet. On a CI-class machine (g++ 12, Debian 12), made to link the
    same way with -static-libstdc++, the number is silently left out of the message instead.
    Naming the shared runtime before the driver's own -lstdc++ makes the linker take every C++
    runtime symbol from it. Only where needed: elsewhere the driver's -lstdc++ may name a newer
    runtime than the system's .so.6.
    """
    if not sys.platform.startswith("linux"):
        return []
    if "-static-libstdc++" in shlex.split(os.environ.get("LDFLAGS", "")):
        return ["-l:libstdc++.so.6"]
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    try:  # the full path where the driver finds a shared libstdc++, the bare name where not
        found = subprocess.run(cxx + ["-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []  # no such compiler: the build itself will say so
    return [] if os.path.isabs(found) and os.path.exists(found) else ["-l:libstdc++.so.6"]


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sources = sorted(glob.glob("csrc/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/*.cu"))
with_cuda = (
    os.environ.get("TUNECOMP_NO_CUDA", "0") != "1"
    and torch.version.cuda is not None
    and _cuda_home is not None
    and bool(cuda_sources)
)

# No -std flag: torch.utils.cpp_extension adds the standard its headers need. -fopenmp:
# at::parallel_for is inlined from ATen's headers and runs serially without it.
cxx_flags = ["-O3", "-fopenmp"]
link_flags = ["-fopenmp"] + _shared_cxx_runtime_flags()
if with_cuda:
    archs = os.environ.get("TUNECOMP_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    nvcc_flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    extension = CUDAExtension(
        "tunecomp._C",
        sources + cuda_sources,
        define_macros=[("TUNECOMP_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    extension = CppExtension("tunecomp._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)

# kernels/ is installed as tunecomp.kernels (a top-level `kernels` would collide).
packages = ["tunecomp"]
if os.path.exists(os.path.join("kernels", "__init__.py")):
    packages.append("tunecomp.kernels")

setup(
    packages=packages,
    package_dir={"tunecomp": "tunecomp", "tunecomp.kernels": "kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
