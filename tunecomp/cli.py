"""The ``tunecomp`` command line (also ``python -m tunecomp``).

    tunecomp info    versions, devices, and which backends run here
    tunecomp demo    compress the linear layers of a timm ViT and report error and size
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from typing import Optional, Sequence

import torch

from . import __version__, ops
from .surgery import replace_linear_layers


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as error:  # noqa: BLE001 - report any import failure, don't crash
        return f"not importable ({type(error).__name__}: {error})"
    return getattr(module, "__version__", "?")


def info() -> str:
    """A plain-text report of versions, devices, the native build and the backends."""
    lines = [
        f"tunecomp  {__version__}",
        f"python    {platform.python_version()} ({platform.machine()})",
        f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton    {_version('triton')}",
        f"timm      {_version('timm')}",
    ]
    if ops._C is None:
        lines.append(f"native    tunecomp._C not built: {ops.NATIVE_IMPORT_ERROR}")
    elif ops._C.with_cuda:
        archs = ", ".join(f"sm_{a // 10}" for a in ops._C.cuda_compiled_archs())
        lines.append(f"native    tunecomp._C with CUDA kernels for {archs}")
    else:
        lines.append("native    tunecomp._C, CPU only")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}    {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
        devices.append("cuda")
    else:
        lines.append("cuda      no GPU visible")
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            chosen = ops.resolve_backend("auto", torch.device(device), dtype)
            lines.append(f"backends on {device}, {str(dtype).replace('torch.', '')} "
                         f"(auto -> {chosen}):")
            for name, reason in ops.available_backends(device, dtype).items():
                lines.append(f"  {name:<7} {'available' if reason is None else 'no: ' + reason}")
    return "\n".join(lines)


def load_timm_model(name: str, pretrained_file: Optional[str] = None, **kwargs) -> torch.nn.Module:
    """A timm model by name, with weights from a local file (safetensors or a torch state
    dict) when given, else randomly initialised. Never downloads."""
    import timm

    if pretrained_file is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    if not os.path.isfile(pretrained_file):
        raise FileNotFoundError(f"--pretrained-file {pretrained_file!r} does not exist")
    return timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"file": pretrained_file}, **kwargs
    )


def demo(model_name: str, pretrained_file: Optional[str], rank_ratios: Sequence[float],
         batch: int, seed: int) -> list:
    """Compress every attention/MLP linear of ``model_name`` at each rank ratio (truncated
    SVD, student alone) and measure the logits' relative error on random images."""
    torch.manual_seed(seed)
    model = load_timm_model(model_name, pretrained_file).eval()
    size = model.default_cfg.get("input_size", (3, 224, 224))
    images = torch.randn(batch, *size)
    with torch.no_grad():
        reference_logits = model(images)
    rows = []
    for ratio in rank_ratios:
        start = time.perf_counter()
        compressed = copy.deepcopy(model)
        report = replace_linear_layers(compressed, rank_ratio=ratio, keep_teacher=False)
        with torch.no_grad():
            logits = compressed(images)
        error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
        total_before = sum(p.numel() for p in model.parameters())
        total_after = total_before - report.params_before + report.params_after
        rows.append({
            "rank_ratio": ratio,
            "layers": len(report.layers),
            "linear_params": report.params_after,
            "linear_params_before": report.params_before,
            "model_params": total_after,
            "model_params_before": total_before,
            "logit_rel_error": error,
            "seconds": time.perf_counter() - start,
        })
    return rows


def _print_demo(model_name: str, pretrained_file: Optional[str], rows: list) -> None:
    weights = pretrained_file or "random init (no weights file given)"
    print(f"model {model_name}, weights: {weights}")
    print(f"{'rank ratio':>10} {'layers':>6} {'linear params':>22} {'model params':>12} "
          f"{'logit rel. error':>16} {'time':>6}")
    for row in rows:
        linear = f"{row['linear_params']:,} ({row['linear_params'] / row['linear_params_before']:.0%})"
        print(f"{row['rank_ratio']:>10g} {row['layers']:>6} {linear:>22} "
              f"{row['model_params']:>12,} {row['logit_rel_error']:>16.2e} {row['seconds']:>5.1f}s")
    if pretrained_file is None:
        print("Random weights have a flat spectrum, so truncation costs much more than on "
              "pretrained weights; full rank (1.0) must reproduce the logits.")


def _ratios(text: str) -> list:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers; got {text!r}")
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"ratios must be in (0, 1]; got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tunecomp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends")
    p = sub.add_parser("demo", help="compress a timm ViT's linear layers, report error and size")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    p.add_argument("--pretrained-file", default=None,
                   help="local weights file (safetensors or state dict); random init if omitted")
    p.add_argument("--rank-ratios", type=_ratios, default=[1.0, 0.5, 0.25],
                   help="comma-separated fractions of full rank (default 1,0.5,0.25)")
    p.add_argument("--batch", type=int, default=4, help="random images to compare logits on")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    elif args.command == "demo":
        rows = demo(args.model, args.pretrained_file, args.rank_ratios, args.batch, args.seed)
        _print_demo(args.model, args.pretrained_file, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
