"""The ``tunecomp`` command line (also ``python -m tunecomp``).

    tunecomp info       versions, devices, and which backends run here
    tunecomp compress   TuneComp: fine-tune, distil and prune a pretrained timm model jointly
    tunecomp demo       a small offline run on real data (scikit-learn's digits), ~2-4 min on 2 cores
    tunecomp export     a `compress` run's model to the compact inference format
    tunecomp bench-model  latency/throughput of an exported model against its dense original
    tunecomp plot       a `compress` run's training curves (loss, accuracy, schedule) as a PNG
"""

from __future__ import annotations

import argparse
import difflib
import gc
import json
import os
import platform
import sys
from typing import Optional, Sequence

import torch

from . import __version__, ops
from .baselines import METHODS
from .data import DATASETS, calibration_batches, load_dataset
from .deploy import write_json
from .plots import plot_training
from .prune import MODES
from .surgery import DEFAULT_TARGETS, prepare
from .train import CHECKPOINT, SEED_MAX, TrainConfig, check_same_config, effective_params, save_checkpoint, train


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
        lines.append(f"native    tunecomp._C, CUDA sources compiled for {archs}")
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


def _create_timm_model(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)`` without weights; an unknown name or kwargs the
    model does not take are a ValueError saying so."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
        raise ValueError(f"model {name!r} is not a timm model{hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as error:  # timm raises all kinds (RuntimeError, ZeroDivisionError, ...)
        raise ValueError(f"{name} cannot be built with kwargs {kwargs} ({type(error).__name__}: {error})") from error


def load_timm_model(name: str, pretrained_file: Optional[str] = None, **kwargs) -> torch.nn.Module:
    """A timm model by name, with weights from a local file (safetensors or a torch state
    dict) when given, else randomly initialised. Never downloads. The classifier head is
    never taken from the file: it starts afresh for the downstream task (timm drops it when
    num_classes is not the architecture's default; where it is, the fresh init is put back)."""
    import timm

    if pretrained_file is None:
        return _create_timm_model(name, **kwargs)
    if not os.path.isfile(pretrained_file):
        raise FileNotFoundError(f"--pretrained-file {pretrained_file!r} does not exist")
    # timm loads non-strictly whenever num_classes differs from the file's (the usual case
    # here), so a file whose names do not match would leave the model random without an
    # error. Built twice from the same seed, with and without the file, a tensor that came out
    # the same was not loaded. (The seed is drawn from the global generator: a seeded caller
    # still gets the same model every time.)
    seed = int(torch.randint(0, 2**62, ()).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        initial = _create_timm_model(name, **kwargs).state_dict()  # name and kwargs checked here
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": pretrained_file},
                                      **kwargs)
        except Exception as error:  # noqa: BLE001 - not a weights file, or other shapes: say which file
            first = str(error).strip().splitlines()[:3]
            raise ValueError(f"--pretrained-file {pretrained_file!r} cannot be loaded into {name} "
                             f"({type(error).__name__}: {' '.join(line.strip() for line in first)})") from error
    heads = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    heads = (heads,) if isinstance(heads, str) else tuple(heads)  # distilled models have two
    in_head = tuple(h + "." for h in heads)
    state = model.state_dict()
    with torch.no_grad():  # timm keeps the file's head where num_classes is its default (1000)
        for k, t in state.items():
            if k.startswith(in_head):
                t.copy_(initial[k])
    # Tensors initialised to a constant (norms' ones, zero biases) are the same loaded or not.
    checked = {k: t for k, t in state.items()
               if t.is_floating_point() and t.numel() > 1 and not k.startswith(in_head)
               and bool(initial[k].min() != initial[k].max())}
    missed = [k for k, t in checked.items() if torch.equal(t, initial[k])]
    if checked and len(missed) == len(checked):
        raise ValueError(f"--pretrained-file {pretrained_file!r}: none of {name}'s weights were loaded "
                         f"from it (its tensor names do not match the model's, e.g. {missed[0]!r})")
    if missed:
        print(f"warning: --pretrained-file {pretrained_file!r} left {len(missed)} of {len(checked)} tensors "
              f"at their random init: {', '.join(missed[:5])}{' ...' if len(missed) > 5 else ''}",
              file=sys.stderr)
    return model


def model_input(model: torch.nn.Module) -> dict:
    """Input size and normalisation a timm model expects."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    channels = getattr(proj, "in_channels", 3)
    if channels != 3:
        raise ValueError(f"in_chans must be 3: the data loaders make RGB images; got {channels} "
                         f"(from --model-kwargs)")
    if patch_embed is not None and getattr(patch_embed, "img_size", None):
        size = patch_embed.img_size[-1]  # follows an img_size override
        if patch_embed.img_size[-2] != size:
            raise ValueError(f"img_size must be square: the data loaders make square images; got "
                             f"{tuple(patch_embed.img_size)} (from --model-kwargs)")
    return {"image_size": int(size), "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}


def save_model(model: torch.nn.Module, out_dir: str, model_name: str, model_kwargs: dict) -> str:
    """The trained model's tensors as safetensors plus a JSON file to rebuild it."""
    from .deploy import save_tensors

    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = os.path.join(out_dir, "model.safetensors")
    save_tensors(state, path)
    ranks = {name: m.rank for name, m in model.named_modules() if hasattr(m, "mask_u")}
    write_json(os.path.join(out_dir, "model.json"), {"model": model_name, "kwargs": model_kwargs, "ranks": ranks,
                                                      "tunecomp": __version__, "torch": torch.__version__})
    return path


# The flags a baseline pipeline (tunecomp.baselines) takes besides the model and the data;
# it runs its own schedule, so the other training flags would do nothing there.
BASELINE_FLAGS = ("steps", "param_ratio", "prune", "lr", "batch_size", "seed", "calib_batches", "targets", "device")
TRAINING_FLAGS = ("rank_ratio", "init", "prune_mode", "decay_steps", "grad_accum", "weight_decay", "warmup_steps",
                  "reg_weight", "eval_every", "checkpoint_every", "resume", "amp", "backend", "num_workers")


def baseline_ignores(args, parser: argparse.ArgumentParser) -> list:
    """The ``--flags`` set to other than their defaults that ``--method`` M would ignore."""
    return [f"--{name.replace('_', '-')}" for name in TRAINING_FLAGS
            if getattr(args, name) != parser.get_default(name)]


def compress_baseline(args, data, model_kwargs) -> dict:
    """``tunecomp compress --method M`` for a baseline pipeline (tunecomp.baselines): the
    same steps, data and parameter count as TuneComp with the same flags. It writes
    summary.json and each phase's log and checkpoint under --out; its model is for the
    comparison and is not saved for ``export``."""
    from .baselines import Budget, run_method

    if args.param_ratio is None:
        raise ValueError("--method other than tunecomp needs --param-ratio (the budget is set in parameters)")
    from .deploy import GPU_RANK_MULTIPLE

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = Budget(steps=args.steps, level=args.param_ratio * (1 - args.prune), rho=args.prune, lr=args.lr,
                    batch_size=args.batch_size, seed=args.seed, calib_batches=args.calib_batches,
                    targets=tuple(args.targets.split(",")),
                    rank_multiple=GPU_RANK_MULTIPLE if device.startswith("cuda") else 1)  # as compress's own
    result = run_method(args.method, lambda: load_timm_model(args.model, args.pretrained_file, **model_kwargs),
                        data, budget, args.out, device)
    result.update(model=args.model, dataset=args.dataset,
                  versions={"tunecomp": __version__, "torch": torch.__version__})
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "summary.json"), result)
    print(f"{args.method}: accuracy {result['accuracy']:.4f}, {result['effective_params']:,} parameters, "
          f"{result['seconds']:.0f}s; written to {args.out}")
    return result


RUN_FILES = ("checkpoint.pt", "log.jsonl", "model.json", "summary.json")
# What else, besides the training config (which train() checks), a resumed run must share with
# the run it continues: the model, the data and the layers' shapes. Not the paths (a data set
# or weights file may move; the checkpoint holds the weights) nor where it runs.
RUN_SETTINGS = ("method", "model", "model_kwargs", "dataset", "classes", "rank_ratio", "param_ratio",
                "targets", "init", "calib_batches")


def run_settings(args) -> dict:
    """What ``run.json`` records and ``--resume`` must match."""
    return {name: getattr(args, name) for name in RUN_SETTINGS}


def check_resume_settings(args) -> None:
    """``--resume``: refuse other settings than those ``--out/run.json`` holds (a run from
    before run.json existed is not checked), before minutes of loading and calibrating."""
    path = os.path.join(args.out, "run.json")
    if not (args.resume and os.path.isfile(path)):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as error:
        raise ValueError(f"--resume: {path} is not valid JSON ({error}): was it edited?") from error
    check_same_config(saved, run_settings(args), path)


def compress(args) -> dict:
    """``tunecomp compress``: prepare, train, save, summarise."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"--out {args.out} is a file; give a directory")
    # A log alone is a run that stopped before its first checkpoint: nothing to resume, nothing
    # a new run would lose but that log (train() starts a fresh one).
    found = [f for f in RUN_FILES if f != "log.jsonl" and os.path.exists(os.path.join(args.out, f))]
    if found and not args.resume:
        resume = "add --resume to continue it, or " if args.method == "tunecomp" else ""
        raise FileExistsError(f"--out {args.out} already holds a run ({', '.join(found)}): {resume}"
                              f"choose another --out")
    if args.resume and not os.path.isfile(os.path.join(args.out, CHECKPOINT)):
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in --out {args.out}: nothing to resume (a run that "
                                f"stopped before its first checkpoint starts again without --resume)")
    if not found and os.path.exists(os.path.join(args.out, "log.jsonl")):
        print(f"note: --out {args.out} holds the log of a run that stopped before its first checkpoint: "
              f"starting afresh (its log.jsonl is replaced)", file=sys.stderr)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, decay_steps=args.decay_steps,
        prune=args.prune, prune_mode=args.prune_mode, reg="none" if args.reg_weight == 0 else "l1",
        reg_weight=args.reg_weight, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
        amp=args.amp, seed=args.seed, num_workers=args.num_workers,
    )
    config.resolved()  # its checks now, before the data and the model are loaded
    check_resume_settings(args)
    torch.manual_seed(args.seed)  # the model's random init (the head, or all without weights)
    model_kwargs = dict(args.model_kwargs or {})
    classes = args.classes
    probe = load_timm_model(args.model, None, **model_kwargs)
    data = load_dataset(args.dataset, args.data_dir, classes=classes, **model_input(probe))
    if model_kwargs.get("num_classes", data.num_classes) != data.num_classes:
        raise ValueError(f"num_classes comes from the data ({data.num_classes} classes of {args.dataset}"
                         f"{' under --classes' if classes else ''}); got {model_kwargs['num_classes']} in "
                         f"--model-kwargs")
    model_kwargs["num_classes"] = data.num_classes
    if args.method != "tunecomp":
        return compress_baseline(args, data, model_kwargs)
    model = load_timm_model(args.model, args.pretrained_file, **model_kwargs)
    params_before = sum(p.numel() for p in model.parameters())
    rank_spec = {"param_ratio": args.param_ratio} if args.param_ratio is not None else {"rank_ratio": args.rank_ratio}
    calib = None
    if args.init != "svd":
        calib = calibration_batches(data.train, args.batch_size, args.calib_batches, args.seed)
    # 2:4 pruning groups U's entries by 4 along the rank: ranks must be multiples of 4. On a GPU
    # multiples of 16, which 4 divides: factor rows the GPU kernels read aligned
    # (tunecomp.deploy.GPU_RANK_MULTIPLE).
    from .deploy import GPU_RANK_MULTIPLE

    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    report = prepare(model, **rank_spec, targets=args.targets.split(","), init=args.init,
                     calib_batches=calib, backend=args.backend,
                     rank_multiple=GPU_RANK_MULTIPLE if on_gpu else 4 if args.prune_mode == "n:m" else 1)
    print(report)
    if not args.resume and int(os.environ.get("RANK", "0")) == 0:  # what a resume must match
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "run.json"), run_settings(args))
    result = train(model, data.train, data.test, config, args.out, resume=args.resume, device=args.device)
    if int(os.environ.get("RANK", "0")) != 0:
        return result
    save_model(model, args.out, args.model, model_kwargs)
    params_after = effective_params(model)
    summary = {
        "accuracy": result["final_accuracy"], "best_accuracy": result["best_accuracy"],
        "params_before": params_before, "params_after": params_after,
        "compression_ratio": params_before / params_after,
        "replaced_layers": len(report.layers), "seconds": result["seconds"],
        "peak_memory_bytes": result["peak_memory_bytes"], "device": result["device"],
        "model": args.model, "dataset": args.dataset, "versions": {"tunecomp": __version__, "torch": torch.__version__},
        "train": result["config"],
    }
    write_json(os.path.join(args.out, "summary.json"), summary)
    try:
        plot_training(args.out)
    except Exception as error:  # noqa: BLE001 - the run's results are saved; a picture must not fail it
        print(f"warning: training.png not drawn ({type(error).__name__}: {error})", file=sys.stderr)
    print(f"accuracy {summary['accuracy']:.4f}, parameters {params_before:,} -> {params_after:,} "
          f"({summary['compression_ratio']:.2f}x smaller), {summary['seconds']:.0f}s; written to {args.out}")
    return summary


def rebuild_run(run_dir: str) -> tuple:
    """``(model, meta)``: the trained model of a ``compress`` run directory and its
    model.json (timm name, kwargs, ranks)."""
    from safetensors.torch import load_file

    from .nn import FusedPrunedLowRankLinear

    meta_path = os.path.join(run_dir, "model.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{run_dir} has no model.json: is it a finished `tunecomp compress` run?")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        model = load_timm_model(meta["model"], None, **meta["kwargs"])
        for name, rank in meta["ranks"].items():
            linear = model.get_submodule(name)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedPrunedLowRankLinear(
                linear.in_features, linear.out_features, rank, bias=linear.bias is not None))
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # json's errors are ValueErrors
        raise ValueError(f"{meta_path} does not describe a model that can be rebuilt "
                         f"({type(error).__name__}: {error}): was it edited?") from error
    weights = os.path.join(run_dir, "model.safetensors")
    try:
        model.load_state_dict(load_file(weights))
    except Exception as error:  # noqa: BLE001 - truncated file, or tensors that do not fit model.json
        first = str(error).strip().splitlines()[:3]
        raise ValueError(f"{weights} cannot be loaded into the model {meta_path} describes "
                         f"({type(error).__name__}: {' '.join(line.strip() for line in first)})") from error
    return model.eval(), meta


def export_run(run_dir: str, out: str, measure: bool, device: Optional[str],
               dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> dict:
    from .deploy import export

    if os.path.realpath(out) == os.path.realpath(run_dir) or any(
            os.path.exists(os.path.join(out, f)) for f in RUN_FILES):
        raise FileExistsError(f"--out {out} is a `tunecomp compress` run directory: exporting there would "
                              f"overwrite its model.safetensors; choose another --out")
    model, meta = rebuild_run(run_dir)
    manifest = export(model, out, arch=meta["model"], arch_kwargs=meta["kwargs"], measure=measure, device=device,
                      dtype=dtype, progress=measure, overwrite=overwrite)  # timing the forms of each layer takes a while
    forms = {}
    for info in manifest["layers"].values():
        forms[info["form"]] = forms.get(info["form"], 0) + 1
    print(f"exported {len(manifest['layers'])} low-rank layers ({', '.join(f'{n} {f}' for f, n in forms.items())}) "
          f"to {out}: {manifest['bytes'] / 2**20:.2f} MiB")
    return manifest


def bench_model(model_dir: str, batches: Sequence[int], device: str, dtype: torch.dtype,
                compile_model: bool, repeats: int = 10, progress: bool = False) -> list:
    """Latency, throughput and peak memory of the exported model and of its dense original
    (same architecture, random weights: speed does not depend on the values), one model on
    the device at a time. Peak memory: on CUDA the allocator's peak during each batch's
    runs (the model's tensors included); on the CPU (Linux) the peak resident memory during
    each batch's runs, in a fresh process per model, above its level before the model was
    built. ``progress``: a line on stderr as each point is measured. ``compile_model``: each
    model compiled for each batch size afresh (a fixed-shape graph, as a deployment at one
    batch size runs). A point that runs out of memory is a row with ``"error"`` and no
    timings; the others are measured. On the CPU each model is timed in a fresh process
    (spawned: a script calling this needs an ``if __name__ == "__main__":`` guard)."""
    from .deploy import read_manifest

    if not read_manifest(model_dir)["arch"]:
        raise ValueError(f"{model_dir}'s manifest names no timm architecture: bench-model needs one to build "
                         f"the dense original (export with arch=...)")
    rows = []
    for label in ("dense", "compressed"):
        args = (model_dir, label, batches, device, dtype, compile_model, repeats, progress)
        if device.startswith("cuda"):
            rows += _bench_one(*args)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                rows += pool.submit(_bench_one, *args).result()
    return rows


def _resident_bytes(field: str) -> Optional[int]:
    """This process's resident memory, "VmRSS" (now) or "VmHWM" (peak), from Linux's /proc."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024  # kB


def _reset_resident_peak() -> bool:
    """Set VmHWM to the current resident memory (Linux >= 4.0); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _resident_bytes("VmHWM") is not None


def _bench_one(model_dir: str, label: str, batches: Sequence[int], device: str, dtype: torch.dtype,
               compile_model: bool, repeats: int, progress: bool = False) -> list:
    from .deploy import load, read_manifest, time_forward

    import timm  # noqa: F401  (imported before the baseline: not part of either model's memory)

    cuda = device.startswith("cuda")
    before = None if cuda or not _reset_resident_peak() else _resident_bytes("VmRSS")
    manifest = read_manifest(model_dir)
    if label == "dense":
        model = load_timm_model(manifest["arch"], None, **manifest["arch_kwargs"]).to(device=device, dtype=dtype).eval()
    else:
        model = load(model_dir, device=device, dtype=dtype)
    size = model_input(model)["image_size"]
    runner, rows = model, []
    for batch in batches:
        if compile_model:  # afresh per batch size: dynamo's recompile limit (8) is never reached
            torch._dynamo.reset()
            runner = torch.compile(model, dynamic=False)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        elif before is not None:
            _reset_resident_peak()  # building and loading the model is not counted
        try:
            x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
            seconds = time_forward(runner, x, repeats)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not _out_of_memory(error):
                raise
            x = None
            rows.append({"model": label, "batch": batch, "latency_ms": None, "images_per_s": None,
                         "peak_memory_bytes": None, "error": "out of memory"})
            if progress:
                print(f"bench-model: {label} batch {batch}: out of memory", file=sys.stderr, flush=True)
            if cuda:
                torch.cuda.empty_cache()
            continue
        if cuda:
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = None if before is None else _resident_bytes("VmHWM") - before
        rows.append({"model": label, "batch": batch, "latency_ms": seconds * 1e3,
                     "images_per_s": batch / seconds, "peak_memory_bytes": peak})
        if progress:
            print(f"bench-model: {label} batch {batch}: {seconds * 1e3:.2f} ms", file=sys.stderr, flush=True)
        del x
    del model, runner
    if compile_model:
        torch._dynamo.reset()  # its compiled graphs hold the model's tensors
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA's OutOfMemoryError, the CPU
    allocator's RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error) \
        or "not enough memory" in str(error)


def _print_bench(rows: list) -> None:
    dense = {r["batch"]: r for r in rows if r["model"] == "dense"}
    print(f"{'model':<11} {'batch':>5} {'latency ms':>11} {'images/s':>10} {'peak MiB':>9} {'speed-up':>8}")
    for r in rows:
        if r["latency_ms"] is None:
            print(f"{r['model']:<11} {r['batch']:>5} {r['error']:>11}")
            continue
        peak = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        base = dense[r["batch"]]["latency_ms"]
        speedup = "n/a" if base is None else f"{base / r['latency_ms']:.2f}x"
        print(f"{r['model']:<11} {r['batch']:>5} {r['latency_ms']:>11.2f} {r['images_per_s']:>10.1f} {peak:>9} {speedup:>8}")


# The demo: a small ViT pretrained on one task (digits 0-4) and compressed while it learns
# another (digits 5-9), against plain dense fine-tuning from the same weights.
DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}


def demo(out_dir: str, steps: int = 200, seed: int = 0) -> list:
    torch.manual_seed(seed)
    source = load_dataset("digits", image_size=16, classes=[0, 1, 2, 3, 4])
    target = load_dataset("digits", image_size=16, classes=[5, 6, 7, 8, 9])
    common = {"batch_size": 64, "seed": seed, "log_every": 20}

    def run(name: str, model, cfg: TrainConfig, data):
        print(f"[{name}] {cfg.steps} steps ...", flush=True)
        result = train(model, data.train, data.test, cfg, os.path.join(out_dir, name), device="cpu")
        print(f"[{name}] accuracy {result['final_accuracy']:.3f} in {result['seconds']:.0f}s", flush=True)
        return result

    pretrained = load_timm_model(DEMO_MODEL, None, num_classes=5, **DEMO_KWARGS)
    run("pretrain-source", pretrained, TrainConfig(steps=2 * steps, lr=2e-3, warmup_steps=20, **common), source)
    weights = os.path.join(out_dir, "pretrained.pth")
    save_checkpoint(weights, pretrained.state_dict())  # atomic, as every file a run writes

    rows = []
    dense = load_timm_model(DEMO_MODEL, weights, num_classes=5, **DEMO_KWARGS)
    params = sum(p.numel() for p in dense.parameters())
    result = run("dense-finetune", dense, TrainConfig(steps=steps, lr=1e-3, **common), target)
    rows.append(("dense fine-tune (teacher)", result["final_accuracy"], params, params))
    for param_ratio, prune in ((0.5, 0.0), (0.5, 0.5), (0.25, 0.0)):
        model = load_timm_model(DEMO_MODEL, weights, num_classes=5, **DEMO_KWARGS)
        calib = calibration_batches(target.train, 64, 4, seed)
        prepare(model, param_ratio=param_ratio, init="whiten", calib_batches=calib)
        cfg = TrainConfig(steps=steps, lr=1e-3, decay_steps=steps // 2, prune=prune, **common)
        result = run(f"tunecomp-p{param_ratio}-rho{prune}", model, cfg, target)
        rows.append((f"TuneComp, linear params x{param_ratio}, rho={prune}", result["final_accuracy"],
                     params, effective_params(model)))
    return rows


def _print_demo(rows: list) -> None:
    print("\nDigits 5-9 (downstream), from a ViT pretrained on digits 0-4; CPU, one seed")
    print(f"{'method':<38} {'accuracy':>8} {'params':>10} {'ratio':>6}")
    for name, accuracy, before, after in rows:
        print(f"{name:<38} {accuracy:>8.3f} {after:>10,} {before / after:>5.2f}x")


def _dtype(name: Optional[str], device: str) -> torch.dtype:
    """``--dtype``, by default bfloat16 on CUDA and float32 on the CPU."""
    return getattr(torch, name or ("bfloat16" if device.startswith("cuda") else "float32"))


# Argument types: a bad value is argparse's usage error naming the flag, not a traceback.


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be a device such as cpu, cuda or cuda:1; got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (tunecomp info)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N]; got {text!r}")
    return text


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"img_size\": 32}}'; got {text!r}")
    return value


def _int_at_least(minimum: int, maximum: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {span}; got {value}")
        return value

    span = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    parse.__name__ = f"integer {span}"
    return parse


def _float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
        if not ((low < value if low_open else low <= value) and (value < high if high_open else value <= high)):
            span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {span}; got {value}")
        return value

    parse.__name__ = "number"
    return parse


def _int_list(minimum: int):
    def parse(text: str) -> list:
        values = [_int_at_least(minimum)(part.strip()) for part in text.split(",")]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise argparse.ArgumentTypeError(f"repeats {duplicates}: {text!r}")
        return values

    parse.__name__ = "comma-separated integers"
    return parse


def _targets(text: str) -> str:
    """Comma-separated layer names, spaces around them dropped: "attn.qkv, mlp.fc1" is the
    same run setting as "attn.qkv,mlp.fc1" (a resume compares them)."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"an empty name in {text!r}")
    return ",".join(names)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, where it has one to show (not None or False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tunecomp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends")

    p = compress_parser = sub.add_parser("compress", help="TuneComp on a timm model and a dataset",
                                         formatter_class=_DefaultsHelp)
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument("--method", default="tunecomp",
                   choices=METHODS,
                   help="TuneComp, or a baseline pipeline at the same budget (tunecomp.baselines)")
    p.add_argument("--model-kwargs", default=None, type=_json_object,
                   help='JSON of extra timm kwargs, e.g. \'{"img_size": 32}\'')
    p.add_argument("--pretrained-file", default=None,
                   help="local weights (safetensors or state dict); the classifier head starts afresh")
    p.add_argument("--dataset", default="cifar100", choices=DATASETS, help="downstream task")
    p.add_argument("--data-dir", default=None, help="where the dataset's files are")
    p.add_argument("--classes", default=None, type=_int_list(0), help="comma-separated class subset, relabelled 0..k-1")
    p.add_argument("--out", required=True,
                   help="output directory (log, checkpoint, model, summary; a baseline --method: summary and "
                        "each phase's log and checkpoint)")
    p.add_argument("--rank-ratio", type=_float_in(0, 1, low_open=True), default=0.25, help="rank as a fraction of full rank")
    p.add_argument("--param-ratio", type=_float_in(0, 1, low_open=True), default=None,
                   help="instead: fraction of each layer's weights kept")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), type=_targets,
                   help="comma-separated nn.Linear names to replace: a name, its tail after a dot "
                        "(attn.qkv), or a glob on the full name (blocks.1*.mlp.*)")
    p.add_argument("--init", default="whiten", choices=("svd", "asvd", "whiten"),
                   help="factor init: plain SVD, or activation-aware from --calib-batches")
    p.add_argument("--calib-batches", type=_int_at_least(1), default=8, help="batches of input statistics for the init")
    p.add_argument("--prune", type=_float_in(0, 1, high_open=True), default=0.0,
                   help="final pruning ratio of factor entries (n:m mode: at most 0.5, in steps of 0.25)")
    p.add_argument("--prune-mode", default="unstructured", choices=MODES,
                   help="entries, whole rank components, or 2 of every 4 entries")
    p.add_argument("--decay-steps", type=_int_at_least(0), default=None,
                   help="T: steps until alpha reaches 0 (default: half of --steps)")
    p.add_argument("--steps", type=_int_at_least(1), default=5000, help="optimiser steps")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64, help="images per step")
    p.add_argument("--grad-accum", type=_int_at_least(1), default=1, help="micro-batches per step")
    p.add_argument("--lr", type=_float_in(0, float("inf"), low_open=True), default=5e-4, help="peak learning rate")
    p.add_argument("--weight-decay", type=_float_in(0, float("inf")), default=0.05, help="AdamW's, on dense weights")
    p.add_argument("--warmup-steps", type=_int_at_least(0), default=100, help="linear LR warm-up")
    p.add_argument("--reg-weight", type=_float_in(0, float("inf")), default=1e-2, help="initial lambda of the L1 regulariser (0: off)")
    p.add_argument("--eval-every", type=_int_at_least(0), default=0, help="steps between evaluations (0: each epoch)")
    p.add_argument("--checkpoint-every", type=_int_at_least(0), default=500, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--device", default=None, type=_device, help="cpu or cuda (default: cuda if there is one)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "none"), help="auto: bf16 on CUDA")
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS, help="the ops' kernels (tunecomp info)")
    p.add_argument("--num-workers", type=_int_at_least(0), default=2, help="data loader processes")
    p.add_argument("--seed", type=_int_at_least(0, SEED_MAX), default=0, help="data order, init and pruning ties")

    p = export_parser = sub.add_parser("export", help="write a compress run's model in the compact inference format")
    p.add_argument("--run", required=True, help="a `tunecomp compress` output directory")
    p.add_argument("--out", required=True, help="directory to write model.safetensors + manifest.json to")
    p.add_argument("--measure", action="store_true", help="choose each layer's form by timing it")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    p.add_argument("--device", default=None, type=_device, help="device to time on with --measure (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="dtype to time in with --measure (the one you will load the model in; "
                        "default: bfloat16 on CUDA, float32 on CPU)")

    p = sub.add_parser("bench-model", help="exported model vs its dense original: latency, throughput")
    p.add_argument("model_dir")
    p.add_argument("--batch", default=[1, 8], type=_int_list(1), help="comma-separated batch sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=_device)
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile both models first")
    p.add_argument("--repeats", type=_int_at_least(1), default=10, help="timed calls per point")

    p = sub.add_parser("plot", help="a compress run's training curves as a PNG (also during the run)")
    p.add_argument("run", help="a `tunecomp compress` output directory")
    p.add_argument("--out", default=None, help="image path (default: RUN/training.png)")

    p = sub.add_parser("demo", help="small offline TuneComp run on real data, prints a table")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--steps", type=_int_at_least(1), default=200, help="optimiser steps per fine-tuning run")
    p.add_argument("--seed", type=_int_at_least(0, SEED_MAX), default=0)
    args = parser.parse_args(argv)
    if args.command == "compress" and args.method != "tunecomp":
        ignored = baseline_ignores(args, compress_parser)
        if ignored:
            compress_parser.error(f"--method {args.method} runs its own schedule (tunecomp.baselines) and would "
                                  f"ignore {', '.join(ignored)}; it takes {', '.join('--' + f.replace('_', '-') for f in BASELINE_FLAGS)}")
    if args.command == "export" and not args.measure and (args.device or args.dtype):
        export_parser.error("--device and --dtype choose where --measure times the forms; give --measure too "
                            "(the file keeps the model's dtype; load(dtype=...) picks the one to run in)")
    try:
        return _run(parser, args)
    except KeyboardInterrupt:
        print(f"tunecomp {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        # A mistake in the arguments or the files named (such errors here say what and
        # where): the message, not a traceback, unless asked for.
        if os.environ.get("TUNECOMP_TRACEBACK"):
            raise
        print(f"tunecomp {args.command}: error: {error}\n(TUNECOMP_TRACEBACK=1 shows the traceback)",
              file=sys.stderr)
        return 2


def _run(parser, args) -> int:
    if args.command == "info":
        print(info())
    elif args.command == "compress":
        compress(args)
    elif args.command == "demo":
        _print_demo(demo(args.out, args.steps, args.seed))
    elif args.command == "export":
        measure_device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        export_run(args.run, args.out, args.measure, measure_device, _dtype(args.dtype, measure_device),
                   args.overwrite)
    elif args.command == "plot":
        print(f"wrote {plot_training(args.run, args.out)}")
    elif args.command == "bench-model":
        from .deploy import read_manifest, verify

        verify(args.model_dir, read_manifest(args.model_dir))  # before minutes of timing the dense model
        _print_bench(bench_model(args.model_dir, args.batch, args.device, _dtype(args.dtype, args.device),
                                 args.compile, args.repeats, progress=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
