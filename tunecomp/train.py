"""The joint fine-tune/distil/prune loop of TuneComp.

Each optimiser step t, before the forward pass, every ``FusedPrunedLowRankLinear`` gets
``alpha = alpha_t`` (the teacher's share of its output) and, every ``prune_every`` steps, its
masks are shrunk to ``rho_t``; the loss is the task loss plus ``lam_t`` times the sparsity
regulariser. The optimiser trains the student factors and every parameter that was not
replaced (head, norms, embeddings, as in full fine-tuning); the frozen teacher weights take
no part and are freed as soon as alpha reaches 0.

Runs on one device or under ``torchrun`` (DistributedDataParallel, one process per device;
rank 0 logs, evaluates and writes). Output directory::

    log.jsonl          one JSON object per logged step / evaluation
    checkpoint.pt      model, masks, optimiser, LR schedule, step, data position, RNG states,
                       the sums behind the next log record (written atomically: a crash never
                       leaves a half-written file)

A run that is not resumed starts both afresh in ``out_dir``. Ctrl-C (SIGINT) in a
single-process run lets the step in flight finish, writes the checkpoint and then raises
``KeyboardInterrupt``, so ``resume=True`` (``tunecomp compress --resume``) continues exactly
where it stopped; a second Ctrl-C stops at once. Exactly with ``num_workers=0``: data-loading
workers seed their random draws (augmentations) when their loader starts, so with workers
those draws restart where a run resumes.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import random
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .nn import FusedPrunedLowRankLinear
from .prune import MODES, SCOPES, prune_, sparsity_penalty
from .schedule import Schedule

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


SEED_MAX = 2**31 - 1  # the seed's range: the per-epoch seeds derived from it stay within int64


@dataclass
class TrainConfig:
    """Knobs of the joint loop. Steps count optimiser steps (after gradient accumulation).

    decay_steps: T, the step at which alpha reaches 0 (default: half of ``steps``).
    prune: the final ratio ρ of pruned factor entries; it ramps up (cubic) from
    ``prune_start`` to ``prune_end`` (default: ``decay_steps``), masks updated every
    ``prune_every`` steps. reg_weight: the regulariser's initial λ, decaying to 0 at
    ``reg_end`` (default: ``prune_end``); ``reg="none"`` switches it off.
    """

    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 0
    decay_steps: Optional[int] = None
    prune: float = 0.0
    prune_mode: str = "unstructured"
    prune_scope: str = "layer"
    prune_start: int = 0
    prune_end: Optional[int] = None
    prune_every: int = 10
    reg: str = "l1"
    reg_weight: float = 1e-2
    reg_end: Optional[int] = None
    eval_every: int = 0  # 0: at the end of every epoch
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "none"
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    kd_weight: float = 0.5  # with a distillation teacher: weight of the KL term vs the task loss
    kd_temperature: float = 2.0

    def resolved(self) -> "TrainConfig":
        """A copy with the defaults that depend on other fields filled in, checked."""
        for name in ("steps", "batch_size", "grad_accum", "warmup_steps", "decay_steps", "prune_start",
                     "prune_end", "prune_every", "reg_end", "eval_every", "log_every", "checkpoint_every",
                     "seed", "num_workers"):
            value = getattr(self, name)
            if not (value is None and name in ("decay_steps", "prune_end", "reg_end")) and \
                    (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise TypeError(f"{name} must be an int; got {value!r}")
        for name in ("lr", "weight_decay", "prune", "reg_weight", "kd_weight", "kd_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number; got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite; got {value!r}")
        c = TrainConfig(**asdict(self))
        c.decay_steps = c.steps // 2 if c.decay_steps is None else c.decay_steps
        c.prune_end = c.decay_steps if c.prune_end is None else c.prune_end
        c.reg_end = c.prune_end if c.reg_end is None else c.reg_end
        positive = {"steps": c.steps, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
                    "prune_every": c.prune_every, "log_every": c.log_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1; got {value}")
        for name in ("decay_steps", "prune_end", "reg_end"):
            if not 0 <= getattr(c, name) <= c.steps:
                raise ValueError(f"{name} must be in [0, steps={c.steps}]; got {getattr(c, name)}")
        if not 0 <= c.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [0, {SEED_MAX}]; got {c.seed}")
        if not 0 <= c.prune_start <= c.prune_end:
            raise ValueError(f"prune_start must be in [0, prune_end={c.prune_end}]; got {c.prune_start}")
        if not 0.0 <= c.prune < 1.0:
            raise ValueError(f"prune must be in [0, 1); got {c.prune}")
        if c.prune_mode == "n:m" and c.prune > 0.5:  # checked now, not when the ramp gets there
            raise ValueError(f"prune must be at most 0.5 with prune_mode 'n:m' (2 of every 4 "
                             f"entries); got {c.prune}")
        if c.prune_mode == "n:m" and abs(c.prune * 4 - round(c.prune * 4)) > 1e-9:
            raise ValueError(f"prune must be a multiple of 1/4 with prune_mode 'n:m' (entries go by "
                             f"groups of 4: 0.25 or 0.5); got {c.prune}")
        if not c.lr > 0:
            raise ValueError(f"lr must be positive; got {c.lr}")
        non_negative = {"weight_decay": c.weight_decay, "warmup_steps": c.warmup_steps,
                        "reg_weight": c.reg_weight, "eval_every": c.eval_every,
                        "checkpoint_every": c.checkpoint_every, "num_workers": c.num_workers}
        for name, value in non_negative.items():
            if not value >= 0:
                raise ValueError(f"{name} must be at least 0; got {value}")
        if c.prune_mode not in MODES or c.prune_scope not in SCOPES:
            raise ValueError(f"prune_mode must be one of {MODES} and prune_scope one of {SCOPES}; "
                             f"got {c.prune_mode!r}, {c.prune_scope!r}")
        if c.prune_mode in ("n:m", "rank") and c.prune_scope != "layer":  # prune.prune_ refuses it
            raise ValueError(f"prune_mode {c.prune_mode!r} prunes each layer on its own: prune_scope must "
                             f"be 'layer'; got {c.prune_scope!r}")
        if not c.kd_temperature > 0 or not 0 <= c.kd_weight <= 1:
            raise ValueError(f"kd_temperature must be positive and kd_weight in [0, 1]; got "
                             f"{c.kd_temperature}, {c.kd_weight}")
        if c.reg not in ("l1", "none") or c.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"reg must be 'l1' or 'none' and amp 'auto', 'bf16' or 'none'; got {c.reg!r}, {c.amp!r}")
        return c

    def schedule(self) -> Schedule:
        c = self.resolved()
        return Schedule(c.decay_steps, c.prune, c.prune_start, c.prune_end,
                        c.reg_weight if c.reg != "none" else 0.0, c.reg_end)


def compressible_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, FusedPrunedLowRankLinear)]


def model_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (the teacher's included while attached)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def effective_params(model: nn.Module) -> int:
    """Parameters a compact export stores: unpruned factor entries and bias of each low-rank
    layer, plus every other parameter. One function for every method, so counts compare."""
    layers = compressible_layers(model)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return rest + sum(layer.num_effective_params() for layer in layers)


# ---- distributed -----------------------------------------------------------------------------


def _dist_setup(device: Optional[str]) -> tuple:
    """(rank, world_size, device); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and device != "cpu":
            torch.cuda.set_device(local)
            dist.init_process_group("nccl")
            return dist.get_rank(), world, torch.device("cuda", local)
        dist.init_process_group("gloo")
        return dist.get_rank(), world, torch.device("cpu")
    if world > 1:
        return dist.get_rank(), world, torch.device(device or "cpu")
    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 1, torch.device(chosen)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list:
    """This process's batches of one epoch. The permutation depends on (seed, epoch) alone,
    so a resumed run sees exactly the batches the interrupted one would have; global batch i
    is ``order[i·B·world : (i+1)·B·world]`` and process r takes its r-th slice of B, so
    ``world`` processes of batch B see what one process of batch B·world would."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    global_batch = batch_size * world
    count = n // global_batch
    if count == 0:
        raise ValueError(f"batch_size {batch_size} x {world} processes exceeds the {n} training examples")
    return [order[i * global_batch + rank * batch_size:i * global_batch + (rank + 1) * batch_size].tolist()
            for i in range(count)]


# ---- checkpoints -------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: str, payload: dict) -> None:
    """torch.save to a temporary file in the same folder, then an atomic rename. A failed
    write (a full disk: torch raises RuntimeError) or an interrupt leaves the earlier
    checkpoint as it was and no temporary file behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, (OSError, RuntimeError)):
            raise OSError(f"checkpoint not written to {path} ({type(error).__name__}: {error}); the "
                          f"earlier one, if any, is unchanged") from error
        raise


def load_checkpoint(path: str, model: nn.Module, config: Optional[dict] = None) -> dict:
    """Load a checkpoint's model state into ``model`` (dropping teachers the checkpoint no
    longer has) and return the whole payload. ``config``: the resolved TrainConfig (as a
    dict) the run continues with, which must be the checkpoint's (``RESUMABLE_CHANGES``
    aside)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which
        raise ValueError(f"cannot read checkpoint {path} ({type(error).__name__}: {error})") from error
    if config is not None:
        check_same_config(payload.get("config"), config, path)
    state = payload["model"]
    for name, layer in model.named_modules():
        if isinstance(layer, FusedPrunedLowRankLinear) and layer.has_teacher:
            if f"{name}.teacher_weight" not in state:
                layer.drop_teacher()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # other ranks, layers or model than the run that wrote it
        first = str(error).splitlines()[:4]
        raise ValueError(f"checkpoint {path} does not fit this model (written with another model, "
                         f"rank or param ratio, or targets?): {' '.join(line.strip() for line in first)}") from error
    return payload


# ---- the loop ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device, amp_dtype=None,
             num_workers: int = 0) -> float:
    """Top-1 accuracy on ``dataset``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                     worker_init_fn=_ignore_interrupts,
                                     generator=torch.Generator()):
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_accuracy: float = 0.0
    history: list = field(default_factory=list)


def train(model: nn.Module, train_set, test_set, config: TrainConfig, out_dir: str,
          resume: bool = False, device: Optional[str] = None,
          distill_from: Optional[nn.Module] = None,
          step_hook: Optional[Callable[[int], None]] = None,
          no_decay: Sequence[nn.Parameter] = ()) -> dict:
    """Run the joint loop on ``model`` (already prepared with low-rank layers, or dense for
    plain fine-tuning) and return a summary dict. See the module doc for ``out_dir``.

    ``distill_from``: a frozen model whose logits the loss also matches (logit KD:
    ``(1-w)·CE + w·T²·KL(teacher_T ‖ model_T)``, w and T from the config), for the
    fine-tune-then-distil baseline. ``step_hook(step)``: called before every step, after
    the schedule (baselines with schedules of their own use it). ``no_decay``: parameters
    that, like the low-rank factors, get no weight decay (the PC-LoRA baseline's factors).
    The summary's ``best_accuracy`` is the best evaluation of the compressed model alone:
    from the step where alpha is 0 (a teacher attached) and the masks are final (pruning)."""
    cfg = config.resolved()
    sched = cfg.schedule()
    rank, world, dev = _dist_setup(device)
    main_process = rank == 0
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    model.to(dev).train()
    if distill_from is not None:
        distill_from.to(dev).eval().requires_grad_(False)
    layers = compressible_layers(model)
    if cfg.prune > 0 and cfg.prune_mode == "n:m":  # refused now, not at the first pruning step
        misfit = [f"{name} (in_features {m.in_features}, rank {m.rank})" for name, m in model.named_modules()
                  if isinstance(m, FusedPrunedLowRankLinear) and (m.in_features % 4 or m.rank % 4)]
        if misfit:
            raise ValueError(f"prune_mode 'n:m' prunes groups of 4 along in_features and the rank: both must "
                             f"be multiples of 4 (prepare(..., rank_multiple=4)); not so in {misfit[:3]}")
    amp_dtype = torch.bfloat16 if cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda") else None

    factors = {id(p) for layer in layers for p in (layer.u, layer.v)} | {id(p) for p in no_decay}
    # and what the model itself says takes none (timm: position embedding, class token)
    exempt = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else ()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # factors get the sparsity regulariser instead; norms and biases no decay
            (decay if p.dim() >= 2 and id(p) not in factors and name not in exempt else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    state = _State()
    saved_running = None  # the sums of the steps since the last log line, where a run resumes
    checkpoint_path = os.path.join(out_dir, CHECKPOINT)
    if resume:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out_dir}")
        payload = load_checkpoint(checkpoint_path, model, asdict(cfg))
        if len(payload["rng"]) != world:  # one random state per process; the global batch is theirs
            raise ValueError(f"resume: {checkpoint_path} was written by {len(payload['rng'])} process(es); this "
                             f"run has {world}: resume with as many (torchrun --nproc_per_node "
                             f"{len(payload['rng'])}), or start a new run elsewhere")
        optimizer.load_state_dict(payload["optimizer"])
        lr_schedule.load_state_dict(payload["lr_schedule"])
        state = _State(**payload["state"])
        saved_running = payload.get("running")
        _set_rng_state(payload["rng"][rank], dev)
        if main_process:
            _end_cut_off_line(os.path.join(out_dir, LOG))
    elif main_process:  # a new run: no records of an earlier one in its log, nor its checkpoint
        for earlier in (LOG, CHECKPOINT):  # (which a crash before this run's first would resume)
            if os.path.exists(os.path.join(out_dir, earlier)):
                os.remove(os.path.join(out_dir, earlier))

    if world > 1:
        # DDP keeps a list of the module's buffers whatever broadcast_buffers says: the
        # teachers' would stay alive after they are dropped. They are frozen and the same on
        # every rank, so DDP is told to leave them out.
        teachers = [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] in ("teacher_weight", "teacher_bias")]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, teachers)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else None
    # broadcast_buffers=False: masks follow from identical weights on every rank.
    forward = ddp or model

    def write_log(record: dict) -> None:
        if main_process:
            with open(os.path.join(out_dir, LOG), "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        rng = [_rng_state(dev)]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if main_process:
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(), "state": asdict(state),
                "rng": rng, "config": asdict(cfg), "running": {k: float(v) for k, v in running.items()},
            })

    compressed_from = max(cfg.decay_steps if any(layer.has_teacher for layer in layers) else 0,
                          cfg.prune_end if cfg.prune > 0 else 0)
    scheduled = -1  # the step whose alpha and masks the model has (apply_schedule's last)

    def run_eval() -> float:
        accuracy = evaluate(model, test_set, cfg.batch_size, dev, amp_dtype, cfg.num_workers) if main_process else 0.0
        if world > 1:
            dist.barrier()
        # The student alone (alpha 0), its masks final. Not state.step: an evaluation every
        # eval_every steps comes after step s's update with step s-1's alpha and masks.
        if scheduled >= compressed_from:
            state.best_accuracy = max(state.best_accuracy, accuracy)
        record = {"step": state.step, "epoch": state.epoch, "eval_accuracy": accuracy}
        state.history.append(record)
        write_log(record)
        return accuracy

    def apply_schedule(step: int) -> tuple:
        nonlocal scheduled
        scheduled = step
        a, rho, lam = sched.at(step)
        for layer in layers:
            if layer.has_teacher:
                layer.alpha = a
        if layers and rho > 0 and (step % cfg.prune_every == 0 or step >= cfg.prune_end):
            prune_(layers, rho, cfg.prune_mode, cfg.prune_scope)
        if a == 0.0 and any(layer.has_teacher for layer in layers):
            before = model_bytes(model)
            for layer in layers:
                layer.drop_teacher()
            write_log({"step": step, "event": "teacher_dropped", "bytes_before": before, "bytes_after": model_bytes(model)})
        return a, rho, lam

    def loader(batch_sampler) -> DataLoader:
        # A private generator: creating the loader draws nothing from the global RNG, so a
        # resumed run's random numbers match the uninterrupted run's. Seeded per epoch and
        # process: the workers' random streams (augmentation) differ from epoch to epoch.
        seed = (cfg.seed * 100_003 + state.epoch) * 4096 + rank
        return DataLoader(train_set, batch_sampler=batch_sampler, num_workers=cfg.num_workers,
                          worker_init_fn=_ignore_interrupts, generator=torch.Generator().manual_seed(seed))

    batches = None

    def next_batch():
        nonlocal batches
        while True:
            if batches is None:
                epoch = _epoch_batches(len(train_set), cfg.batch_size, cfg.seed, state.epoch, rank, world)
                batches = iter(loader(epoch[state.batch_in_epoch:]))
            batch = next(batches, None)
            if batch is not None:
                state.batch_in_epoch += 1
                return batch
            if cfg.eval_every == 0:  # an epoch is over
                run_eval()
            state.epoch, state.batch_in_epoch, batches = state.epoch + 1, 0, None

    start_time = time.perf_counter()
    progress = None
    if cfg.progress and main_process:
        from tqdm.auto import tqdm
        # disable=None: no bar when the output is not a terminal (logs stay readable)
        progress = tqdm(total=cfg.steps, initial=state.step, desc="tunecomp", unit="step",
                        dynamic_ncols=True, disable=None)
    zero = torch.zeros((), device=dev)
    running = {"loss": zero, "task": zero, "correct": zero, "seen": 0}
    if saved_running:  # float32 sums saved as Python floats: restored exactly
        running = {k: zero + v if k != "seen" else int(v) for k, v in saved_running.items()}
    interrupted = _DeferredInterrupt(enabled=world == 1)
    try:
        while state.step < cfg.steps:
            a, rho, lam = apply_schedule(state.step)
            if step_hook is not None:
                step_hook(state.step)
            optimizer.zero_grad(set_to_none=True)
            for micro in range(cfg.grad_accum):
                images, labels = (t.to(dev, non_blocking=True) for t in next_batch())
                last = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                    with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = forward(images)
                        task = F.cross_entropy(logits.float(), labels)
                        loss = task
                        if distill_from is not None:
                            with torch.no_grad():
                                target = distill_from(images).float() / cfg.kd_temperature
                            kd = F.kl_div(F.log_softmax(logits.float() / cfg.kd_temperature, -1),
                                          F.log_softmax(target, -1), log_target=True, reduction="batchmean")
                            loss = (1 - cfg.kd_weight) * task + cfg.kd_weight * cfg.kd_temperature ** 2 * kd
                        if lam > 0 and layers:
                            loss = loss + lam * sparsity_penalty(layers, cfg.prune_mode)
                    (loss / cfg.grad_accum).backward()
                # kept as tensors: no device sync until a log line is written
                running["loss"] = running["loss"] + loss.detach()
                running["task"] = running["task"] + task.detach()
                running["correct"] = running["correct"] + (logits.argmax(-1) == labels).sum()
                running["seen"] += len(labels)
            lr = lr_schedule.get_last_lr()[0]  # the step's own, logged below
            optimizer.step()
            lr_schedule.step()
            state.step += 1
            if progress is not None:
                progress.update(1)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                micro_steps = max(1, running["seen"] // cfg.batch_size)
                write_log({
                    "step": state.step, "epoch": state.epoch,
                    "loss": float(running["loss"]) / micro_steps,
                    "task_loss": float(running["task"]) / micro_steps,
                    "train_accuracy": float(running["correct"]) / max(1, running["seen"]),
                    "alpha": a, "rho": rho, "lambda": lam, "lr": lr,
                    "sparsity": _factor_sparsity(layers), "seconds": time.perf_counter() - start_time,
                })
                if progress is not None:
                    shown = {"loss": f"{float(running['task']) / micro_steps:.3f}"}
                    if layers:
                        shown.update(alpha=f"{a:.2f}", rho=f"{rho:.2f}")
                    progress.set_postfix(shown)
                running = {"loss": zero, "task": zero, "correct": zero, "seen": 0}
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                run_eval()  # (the last step's is the final evaluation below)
            # and after the last step, before the final evaluation: an interrupt there (no longer
            # deferred) loses no training
            if ((cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or interrupted.requested
                    or state.step == cfg.steps):
                checkpoint()
            if interrupted.requested:
                if progress is not None:
                    progress.close()
                print(f"interrupted after step {state.step} of {cfg.steps}: checkpoint written to "
                      f"{checkpoint_path}; resume=True (tunecomp compress --resume) continues the run",
                      file=sys.stderr, flush=True)
                raise KeyboardInterrupt
    finally:
        interrupted.restore()
        if progress is not None:
            progress.close()

    # The end: the student alone, at its final sparsity. The checkpoint stays the last step's,
    # written before this: a resumed finished run schedules and evaluates again.
    apply_schedule(cfg.steps)
    final_accuracy = run_eval()
    summary = {
        "final_accuracy": final_accuracy,
        "best_accuracy": state.best_accuracy,
        "steps": state.step,
        "effective_params": effective_params(model),
        "model_bytes": model_bytes(model),
        "factor_sparsity": _factor_sparsity(layers),
        "seconds": time.perf_counter() - start_time,
        "peak_memory_bytes": _peak_memory(dev),
        "device": str(dev),
        "world_size": world,
        "config": asdict(cfg),
    }
    if main_process:
        with open(os.path.join(out_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _ignore_interrupts(worker_id: int) -> None:
    """Data loader workers leave Ctrl-C to the main process: it reaches every process of the
    terminal's group, and a worker that stopped (PyTorch's default) would fail the step the
    main process finishes before writing its checkpoint (_DeferredInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _DeferredInterrupt:
    """While enabled (main thread, one process), the first SIGINT only sets ``requested``, so
    the loop can finish its step and checkpoint at a step boundary; the handler then reverts
    to the previous one, so a second SIGINT interrupts at once. Under several processes the
    ranks would see the signal at different steps and the checkpoint's collective would hang:
    there, and off the main thread (where handlers cannot be set), SIGINT is left alone."""

    def __init__(self, enabled: bool = True):
        self.requested = False
        self._installed = enabled and threading.current_thread() is threading.main_thread()
        if self._installed:
            previous = signal.signal(signal.SIGINT, self._handle)
            # None: a handler set outside Python, which signal.signal cannot put back (SIG_DFL
            # is 0, falsy, and put back as it is)
            self._previous = signal.default_int_handler if previous is None else previous

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.restore()
        print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


# What a resumed run may change: how it reports and saves, not what it computes.
RESUMABLE_CHANGES = ("eval_every", "log_every", "checkpoint_every", "num_workers", "progress")


def check_same_config(saved: Optional[dict], now: dict, path: str) -> None:
    """A resumed run continues the saved one bit for bit only with the same settings."""
    if saved is None:
        return
    changed = [f"{k} {saved[k]!r} -> {now.get(k)!r}" for k in saved
               if k not in RESUMABLE_CHANGES and saved[k] != now.get(k)]
    if changed:
        raise ValueError(f"resume: {path} was written with other settings ({'; '.join(changed)}); "
                         f"resume with the run's own settings, or start a new run elsewhere")


def _end_cut_off_line(path: str) -> None:
    """A run killed while writing its log leaves a last line without its newline: end it, so
    the resumed run's records start on lines of their own."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _factor_sparsity(layers: list) -> float:
    total = sum(layer.mask_u.numel() + layer.mask_v.numel() for layer in layers)
    if total == 0:
        return 0.0
    kept = sum(int(layer.mask_u.sum()) + int(layer.mask_v.sum()) for layer in layers)
    return 1.0 - kept / total
