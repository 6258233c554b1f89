"""Where a result was measured: the device's name and the versions. Every results file
(kernel and model benchmarks, accuracy tables) records them the same way."""

from __future__ import annotations

import platform

import torch

from . import __version__


def device_name(device="cpu") -> str:
    """``"NVIDIA H100 80GB HBM3"``, or ``"CPU <model name>, <n> threads"`` for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:  # not Linux
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def versions() -> dict:
    """Versions of Python, torch (and the CUDA it was built for), Triton and tunecomp."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "tunecomp": __version__}
    try:
        import triton

        found["triton"] = triton.__version__
    except Exception as error:  # noqa: BLE001 - triton absent or broken: record, don't fail
        found["triton"] = f"not importable ({type(error).__name__})"
    return found

