"""The joint loop: schedules applied, teacher freed, exact sparsity, logs, crash + resume."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import timm
import torch

from tunecomp import TrainConfig, prepare, train
from tunecomp.data import load_dataset
from tunecomp.train import compressible_layers, effective_params

TINY = {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_setup(init="whiten"):
    torch.manual_seed(0)
    data = load_dataset("digits", image_size=8, classes=[0, 1, 2, 3, 4])
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY)
    calib = [torch.stack([data.train[i][0] for i in range(64)])]
    prepare(model, param_ratio=0.5, init=init, calib_batches=calib if init != "svd" else None)
    return model, data


def read_log(path):
    with open(os.path.join(path, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_joint_loop_end_to_end(tmp_path):
    model, data = tiny_setup()
    layers = compressible_layers(model)
    assert all(layer.alpha == 1.0 and layer.has_teacher for layer in layers)
    cfg = TrainConfig(steps=60, batch_size=32, lr=3e-3, decay_steps=30, prune=0.4, prune_every=5,
                      log_every=10, progress=False)
    summary = train(model, data.train, data.test, cfg, str(tmp_path), device="cpu")
    log = read_log(tmp_path)
    dropped = [r for r in log if r.get("event") == "teacher_dropped"]
    assert len(dropped) == 1 and dropped[0]["step"] == 30
    assert dropped[0]["bytes_after"] < dropped[0]["bytes_before"]
    assert all(not layer.has_teacher and layer.alpha == 0.0 for layer in layers)
    for layer in layers:  # each factor pruned to exactly the target ratio
        for mask in (layer.mask_u, layer.mask_v):
            assert int((~mask).sum()) == round(0.4 * mask.numel())
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [10, 20, 30, 40, 50, 60]
    alphas = [r["alpha"] for r in steps]
    assert alphas == sorted(alphas, reverse=True) and alphas[-1] == 0.0
    assert any("eval_accuracy" in r for r in log)
    assert summary["effective_params"] == effective_params(model)
    assert summary["factor_sparsity"] == pytest.approx(0.4, abs=0.01)
    assert summary["final_accuracy"] > 0.4  # 5 classes: chance is 0.2
    assert os.path.isfile(tmp_path / "checkpoint.pt") and os.path.isfile(tmp_path / "train_summary.json")
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no half-written checkpoint left


def test_distillation_term_survives_the_sparsity_penalty(tmp_path):
    """With a distillation teacher and the L1 penalty both on, the logged loss is not the one
    without the teacher (the penalty once replaced the KD loss instead of adding to it)."""
    losses = []
    for with_teacher in (False, True):
        model, data = tiny_setup(init="svd")
        distill = None
        if with_teacher:  # constant logits, far from the student's
            distill = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(5))
            distill(data.train[0][0][None])
            torch.nn.init.zeros_(distill[1].weight)
            with torch.no_grad():
                distill[1].bias.copy_(torch.tensor([10.0, 0, 0, 0, 0]))
        cfg = TrainConfig(steps=2, batch_size=16, lr=1e-3, decay_steps=2, reg="l1", reg_weight=1e-3,
                          kd_weight=1.0, log_every=1, progress=False)
        out = tmp_path / str(with_teacher)
        train(model, data.train, data.test, cfg, str(out), device="cpu", distill_from=distill)
        first = next(r for r in read_log(out) if "loss" in r)
        assert first["lambda"] > 0
        losses.append(first["loss"])
    assert abs(losses[0] - losses[1]) > 1e-3, losses


class CrashingDataset(torch.utils.data.Dataset):
    """Raises after `crash_after` items have been read: a process killed mid-run."""

    def __init__(self, base, crash_after):
        self.base, self.left = base, crash_after

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("simulated crash")
        return self.base[i]


def test_crash_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=24, batch_size=32, grad_accum=2, lr=3e-3, decay_steps=8, prune=0.3,
                      prune_every=2, checkpoint_every=5, eval_every=7, log_every=4, progress=False)
    straight_model, data = tiny_setup("svd")
    train(straight_model, data.train, data.test, cfg, str(tmp_path / "straight"), device="cpu")

    model, data = tiny_setup("svd")
    crashing = CrashingDataset(data.train, crash_after=32 * 2 * 12 + 5)  # inside step 13
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(model, crashing, data.test, cfg, str(tmp_path / "resumed"), device="cpu")
    payload = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert payload["state"]["step"] == 10  # the last checkpoint before the crash
    log = tmp_path / "resumed" / "log.jsonl"
    with open(log, "a") as f:  # as if killed while writing a record
        f.write('{"step": 13, "epoch": 0, "lo')

    fresh, data = tiny_setup("svd")  # a new process: teachers attached again, RNG elsewhere
    torch.manual_seed(1234)
    train(fresh, data.train, data.test, cfg, str(tmp_path / "resumed"), resume=True, device="cpu")
    straight, resumed = straight_model.state_dict(), fresh.state_dict()
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # the cut-off record stays on a line of its own; every step's record can be read
    from tunecomp.plots import read_log as read_records

    with pytest.warns(UserWarning, match="skipped what is not a JSON record with a step"):
        steps, evals, _ = read_records(str(log))
    assert [r["step"] for r in steps] == [4, 8, 12, 16, 20, 24]
    assert [r["step"] for r in evals] == [7, 14, 21, 24]
    # and the records say what the uninterrupted run's say: the step-12 record sums steps
    # 9-12 across the resume at 10 (the sums since the last record are in the checkpoint)
    straight_steps, straight_evals, _ = read_records(str(tmp_path / "straight" / "log.jsonl"))
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in records]
                for records in (steps, straight_steps, evals, straight_evals)]
    assert timeless[0] == timeless[1] and timeless[2] == timeless[3]


def test_ctrl_c_checkpoints_after_the_step_in_flight_and_resume_reproduces_the_run(tmp_path, capfd):
    """The first SIGINT lets the step finish, writes the checkpoint there, then raises
    KeyboardInterrupt; resuming from it gives the uninterrupted run's weights exactly."""
    import signal

    cfg = TrainConfig(steps=16, batch_size=32, decay_steps=6, prune=0.3, prune_every=2,
                      checkpoint_every=0, log_every=4, progress=False)
    straight_model, data = tiny_setup("svd")
    train(straight_model, data.train, data.test, cfg, str(tmp_path / "straight"), device="cpu")

    def interrupt_at(step):
        if step == 9:
            os.kill(os.getpid(), signal.SIGINT)

    model, data = tiny_setup("svd")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(model, data.train, data.test, cfg, str(tmp_path / "resumed"), device="cpu", step_hook=interrupt_at)
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    assert "interrupted after step 10 of 16: checkpoint written" in capfd.readouterr().err
    payload = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert payload["state"]["step"] == 10

    fresh, data = tiny_setup("svd")
    train(fresh, data.train, data.test, cfg, str(tmp_path / "resumed"), resume=True, device="cpu")
    straight, resumed = straight_model.state_dict(), fresh.state_dict()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_an_interrupt_in_the_final_evaluation_loses_no_training(tmp_path, monkeypatch):
    """The final evaluation runs after the loop, where Ctrl-C is no longer deferred: the
    checkpoint of the last step is written before it, so a resume only evaluates again."""
    cfg = TrainConfig(steps=6, batch_size=32, decay_steps=3, prune=0.3, prune_every=2,
                      checkpoint_every=0, eval_every=0, log_every=2, progress=False)
    straight, data = tiny_setup("svd")
    want = train(straight, data.train, data.test, cfg, str(tmp_path / "straight"), device="cpu")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    model, data = tiny_setup("svd")
    with monkeypatch.context() as patch:
        patch.setattr(sys.modules["tunecomp.train"], "evaluate", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(model, data.train, data.test, cfg, str(tmp_path / "resumed"), device="cpu")
    payload = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert payload["state"]["step"] == 6
    fresh, data = tiny_setup("svd")
    got = train(fresh, data.train, data.test, cfg, str(tmp_path / "resumed"), resume=True, device="cpu")
    assert got["final_accuracy"] == want["final_accuracy"]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


@pytest.mark.parametrize("failure", [RuntimeError("unexpected pos 1024 vs 918"), KeyboardInterrupt()])
def test_a_failed_checkpoint_write_keeps_the_earlier_one_and_leaves_no_temporary(tmp_path, monkeypatch,
                                                                                 failure):
    """A full disk (torch.save raises RuntimeError) is an OSError naming the file; a Ctrl-C
    during the write goes on as one. Either way the earlier checkpoint stays whole."""
    from tunecomp.train import save_checkpoint

    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def save_half(payload, file):
        real_save(payload, file)
        with open(file, "r+b") as f:
            f.truncate(10)
        raise failure

    monkeypatch.setattr(torch, "save", save_half)
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, {"step": 2})
    else:
        with pytest.raises(OSError, match=f"checkpoint not written to {re.escape(path)} "
                                          r"\(RuntimeError: unexpected pos 1024 vs 918\)"):
            save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_run_not_resumed_starts_a_fresh_log(tmp_path):
    """...and has no checkpoint of the earlier run, which a crash before its own first one
    would have let a resume continue."""
    model, data = tiny_setup("svd")
    train(model, data.train, data.test, TrainConfig(steps=6, batch_size=16, log_every=2, checkpoint_every=3,
                                                    progress=False), str(tmp_path), device="cpu")
    assert (tmp_path / "checkpoint.pt").exists()
    model, data = tiny_setup("svd")
    found = []
    train(model, data.train, data.test, TrainConfig(steps=3, batch_size=16, log_every=1, progress=False),
          str(tmp_path), device="cpu", step_hook=lambda step: found.append((tmp_path / "checkpoint.pt").exists()))
    assert [r["step"] for r in read_log(str(tmp_path)) if "loss" in r] == [1, 2, 3]
    assert found[0] is False


def test_logged_lr_is_the_one_each_step_used(tmp_path):
    """Warm-up then cosine (TrainConfig.lr times the factor of the step): the record of step
    s gives the rate step s ran with, not the next one."""
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, warmup_steps=2, log_every=1, progress=False)
    model, data = tiny_setup("svd")
    train(model, data.train, data.test, cfg, str(tmp_path), device="cpu")
    factors = [(s + 1) / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(6)]
    logged = [r["lr"] for r in read_log(str(tmp_path)) if "loss" in r]
    assert logged == pytest.approx([1e-3 * f for f in factors], rel=1e-12)
    assert logged[0] == pytest.approx(5e-4) and logged[-1] > 0  # the last step's rate is not yet 0


def test_sigint_handler_put_back_as_it_was(tmp_path):
    """SIG_DFL (0, falsy) and SIG_IGN come back as they were, not as Python's default."""
    import signal

    model, data = tiny_setup("svd")
    before = signal.getsignal(signal.SIGINT)
    try:
        for handler in (signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(signal.SIGINT, handler)
            train(model, data.train, data.test, TrainConfig(steps=1, batch_size=16, progress=False),
                  str(tmp_path / str(int(handler))), device="cpu")
            assert signal.getsignal(signal.SIGINT) == handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_dense_model_is_plain_fine_tuning(tmp_path):
    data = load_dataset("digits", image_size=8, classes=[0, 1])
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, **TINY)
    summary = train(model, data.train, data.test, TrainConfig(steps=5, batch_size=16, progress=False), str(tmp_path), device="cpu")
    assert summary["effective_params"] == sum(p.numel() for p in model.parameters())


def test_data_loader_seeds_differ_by_epoch_and_repeat_by_run(tmp_path, monkeypatch):
    """The loader's generator seeds its workers' random streams (augmentation): a new seed
    each epoch (one seed for every epoch gave the workers the same draws each epoch), the
    same seeds on a rerun."""
    train_module = sys.modules["tunecomp.train"]  # (tunecomp.train is also the function)

    data = load_dataset("digits", image_size=8, classes=[0, 1])  # 288 training images
    seeds = []
    loader = train_module.DataLoader

    def spy(*args, generator=None, **kwargs):
        if "batch_sampler" in kwargs:  # the training loader (not evaluate's)
            seeds.append(generator.initial_seed())
        return loader(*args, generator=generator, **kwargs)

    monkeypatch.setattr(train_module, "DataLoader", spy)
    runs = []
    for run in range(2):
        seeds.clear()
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, **TINY)
        cfg = TrainConfig(steps=28, batch_size=32, progress=False, eval_every=100)  # 9 steps an epoch
        train(model, data.train, data.test, cfg, str(tmp_path / str(run)), device="cpu")
        runs.append(list(seeds))
    assert len(runs[0]) == 4 and len(set(runs[0])) == 4, runs[0]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("change, words", [
    (dict(decay_steps=50), "decay_steps must be in [0, steps=20]"),
    (dict(prune=1.0), "prune must be in [0, 1)"),
    (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(prune_mode="blocks"), "prune_mode must be one of"),
    (dict(prune_start=15, prune_end=10), "prune_start must be in [0, prune_end=10]"),
    (dict(log_every=0), "log_every must be at least 1"),
    (dict(kd_temperature=0.0), "kd_temperature must be positive"),
    (dict(kd_weight=1.5), "kd_weight in [0, 1]"),
    (dict(prune_mode="n:m", prune_scope="global"), "prune_scope must be 'layer'; got 'global'"),
    (dict(prune_mode="rank", prune_scope="global"), "prune_mode 'rank' prunes each layer on its own"),
])
def test_config_checks(change, words):
    with pytest.raises(ValueError) as info:
        TrainConfig(steps=20, **change).resolved()
    assert words in str(info.value)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    model, data = tiny_setup("svd")
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt in"):
        train(model, data.train, data.test, TrainConfig(steps=2, progress=False), str(tmp_path), resume=True, device="cpu")


def test_resume_refuses_other_settings_and_unreadable_checkpoints(tmp_path):
    """A resumed run continues the saved one only with its settings (how often it logs,
    evaluates and saves aside); a checkpoint that cannot be read or does not fit says so."""
    cfg = TrainConfig(steps=4, batch_size=16, decay_steps=2, prune=0.3, prune_every=1, progress=False)
    model, data = tiny_setup("svd")
    train(model, data.train, data.test, cfg, str(tmp_path), device="cpu")
    changed = dataclasses.replace(cfg, steps=6, prune=0.5)
    with pytest.raises(ValueError, match=r"other settings \(steps 4 -> 6; prune 0.3 -> 0.5\)"):
        train(tiny_setup("svd")[0], data.train, data.test, changed, str(tmp_path), resume=True, device="cpu")
    reporting = dataclasses.replace(cfg, log_every=1, eval_every=2, checkpoint_every=1, num_workers=0)
    train(tiny_setup("svd")[0], data.train, data.test, reporting, str(tmp_path), resume=True, device="cpu")

    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=8,
                              patch_size=4, embed_dim=32, depth=1, num_heads=2)
    prepare(other, param_ratio=0.25, init="svd")  # other ranks than the run's
    with pytest.raises(ValueError, match="does not fit this model"):
        train(other, data.train, data.test, cfg, str(tmp_path), resume=True, device="cpu")
    checkpoint = tmp_path / "checkpoint.pt"
    payload = torch.load(checkpoint, weights_only=True)
    torch.save({**payload, "rng": payload["rng"] * 2}, checkpoint)  # as written by two processes
    with pytest.raises(ValueError, match=r"written by 2 process\(es\); this run has 1: resume with as many "
                                         r"\(torchrun --nproc_per_node 2\)"):
        train(tiny_setup("svd")[0], data.train, data.test, cfg, str(tmp_path), resume=True, device="cpu")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="cannot read checkpoint .*checkpoint.pt"):
        train(tiny_setup("svd")[0], data.train, data.test, cfg, str(tmp_path), resume=True, device="cpu")


@pytest.mark.parametrize("field, value, words", [
    ("prune_mode", "n:m", "at most 0.5 with prune_mode 'n:m'"), ("lr", 0.0, "lr must be positive"),
    ("eval_every", -1, "eval_every must be at least 0"), ("reg_weight", -1.0, "reg_weight must be at least 0"),
    ("seed", -1, r"seed must be in \[0, 2147483647\]; got -1"),
    ("seed", 10**11, r"seed must be in \[0, 2147483647\]; got 100000000000"),  # seeds per epoch: int64
])
def test_config_checks_before_training(field, value, words):
    config = TrainConfig(prune=0.75 if field == "prune_mode" else 0.0, **{field: value})
    with pytest.raises(ValueError, match=words):
        config.resolved()


DDP_SCRIPT = """
import gc, os, sys, timm, torch, weakref
from tunecomp import TrainConfig, prepare, train
from tunecomp.data import load_dataset

def run(out, batch_size):
    torch.manual_seed(0)
    data = load_dataset("digits", image_size=8, classes=[0, 1, 2])
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=8,
                              patch_size=4, embed_dim=32, depth=1, num_heads=2)
    prepare(model, param_ratio=0.5, init="svd")
    teachers = [weakref.ref(t) for name, t in model.named_buffers() if name.endswith("teacher_weight")]
    alive = {}

    def after_the_drop(step):  # alpha is 0 from step 4: the teachers must be gone
        if step == 6:
            gc.collect()
            alive["teachers"] = sum(ref() is not None for ref in teachers)

    cfg = TrainConfig(steps=8, batch_size=batch_size, lr=2e-3, decay_steps=4, progress=False)
    summary = train(model, data.train, data.test, cfg, out, device="cpu", step_hook=after_the_drop)
    assert len(teachers) == 4 and alive == {"teachers": 0}, alive
    return model, summary

if __name__ == "__main__":
    model, summary = run(sys.argv[1], 16)
    assert summary["world_size"] == 2
    torch.save(model.state_dict(), os.path.join(sys.argv[1], f"state{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "ddp")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    replicas = [torch.load(tmp_path / "ddp" / f"state{r}.pt", weights_only=True) for r in (0, 1)]
    sys.path.insert(0, str(tmp_path))
    try:
        import ddp_run
    finally:
        sys.path.pop(0)
    single, _ = ddp_run.run(str(tmp_path / "single"), 32)  # one process, batch 2 x 16
    for key, value in single.state_dict().items():
        assert torch.equal(replicas[0][key], replicas[1][key]), key  # replicas stay identical
        if value.is_floating_point():
            # The same math summed in another order (gradient all-reduce): rounding only
            # (measured: at most 4e-7 apart; a wrong data split moves them by ~1e-3).
            got = replicas[0][key]
            if key.endswith("attn.qkv.bias"):
                # Except the attention key bias: its true gradient is exactly zero (softmax
                # ignores it), so Adam turns rounding noise into steps of up to lr (measured
                # 1e-5 apart). Checked loosely on its own, the query and value biases tightly.
                k = slice(value.numel() // 3, 2 * value.numel() // 3)
                assert torch.allclose(got[k], value[k], rtol=0, atol=1e-4), key
                got, value = got.clone(), value.clone()
                got[k] = value[k] = 0
            assert torch.allclose(got, value, rtol=1e-5, atol=2e-6), key
    log = read_log(tmp_path / "ddp")
    assert sum(1 for r in log if r.get("step") == 8 and "loss" in r) == 1  # rank 0 alone logs


@pytest.mark.parametrize("field, value, error, words", [
    ("steps", 3.5, TypeError, "steps must be an int; got 3.5"),
    ("batch_size", 16.5, TypeError, "batch_size must be an int; got 16.5"),
    ("grad_accum", True, TypeError, "grad_accum must be an int; got True"),
    ("prune_end", 2.0, TypeError, "prune_end must be an int; got 2.0"),
    ("prune", "0.5", TypeError, "prune must be a number; got '0.5'"),
    ("lr", float("inf"), ValueError, "lr must be finite; got inf"),
    ("kd_temperature", float("nan"), ValueError, "kd_temperature must be finite; got nan"),
])
def test_config_types_are_checked(field, value, error, words):
    with pytest.raises(error, match=re.escape(words)):
        TrainConfig(**{field: value}).resolved()


def test_best_accuracy_counts_the_compressed_model_alone(tmp_path, monkeypatch):
    """Evaluations while the teacher still counts (alpha > 0) or before the masks are final
    measure another model than the one the run ends with: not in best_accuracy (here each
    evaluation scores lower than the one before). An evaluation every eval_every steps comes
    after step s's update with step s-1's alpha and masks: the one at step 6 = prune_end still
    has rho(5) < 0.5, so the first counted is at step 8."""
    scores = iter([0.9, 0.8, 0.7, 0.6, 0.5])
    states = []

    def evaluate(model, *args):
        layers = compressible_layers(model)
        states.append((max(layer.alpha for layer in layers), train_module._factor_sparsity(layers)))
        return next(scores)

    train_module = sys.modules["tunecomp.train"]
    monkeypatch.setattr(train_module, "evaluate", evaluate)
    model, data = tiny_setup("svd")
    cfg = TrainConfig(steps=10, batch_size=16, decay_steps=4, prune=0.5, prune_end=6, prune_every=1,
                      eval_every=2, progress=False)
    summary = train(model, data.train, data.test, cfg, str(tmp_path), device="cpu")
    evals = [r for r in read_log(tmp_path) if "eval_accuracy" in r]
    # one evaluation per step: the last step's is the final one (after the final pruning)
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10]
    assert summary["final_accuracy"] == evals[-1]["eval_accuracy"] == 0.5
    compressed = [alpha == 0.0 and sparsity == 0.5 for alpha, sparsity in states]
    assert compressed == [False, False, False, True, True], states
    assert summary["best_accuracy"] == 0.6


def test_best_accuracy_counts_the_evaluation_at_the_first_compressed_step(tmp_path, monkeypatch):
    """As above with prune_end 7: the evaluation after step 8 ran with step 7's masks, the
    final ones, so it counts (0.6), the first that does."""
    scores = iter([0.9, 0.8, 0.7, 0.6, 0.5])
    monkeypatch.setattr(sys.modules["tunecomp.train"], "evaluate", lambda *args: next(scores))
    model, data = tiny_setup("svd")
    cfg = TrainConfig(steps=10, batch_size=16, decay_steps=4, prune=0.5, prune_end=7, prune_every=1,
                      eval_every=2, progress=False)
    assert train(model, data.train, data.test, cfg, str(tmp_path), device="cpu")["best_accuracy"] == 0.6


def test_the_final_ratio_is_reached_at_prune_end_between_prune_steps(tmp_path):
    """Pruning runs every prune_every steps and at every step from prune_end on: with
    prune_end 15 and prune_every 10, step 15 already runs at the final ratio."""
    train_module = sys.modules["tunecomp.train"]
    model, data = tiny_setup("svd")
    layers = compressible_layers(model)
    seen = {}
    cfg = TrainConfig(steps=16, batch_size=16, decay_steps=4, prune=0.5, prune_end=15, prune_every=10,
                      progress=False)
    train(model, data.train, data.test, cfg, str(tmp_path), device="cpu",
          step_hook=lambda step: seen.setdefault(step, train_module._factor_sparsity(layers)))
    assert seen[14] < 0.5 and seen[15] == pytest.approx(0.5, abs=1e-3)


def test_a_log_record_averages_the_steps_since_the_last(tmp_path):
    runs = {}
    for every in (1, 2):
        model, data = tiny_setup("svd")
        cfg = TrainConfig(steps=4, batch_size=16, log_every=every, progress=False)
        train(model, data.train, data.test, cfg, str(tmp_path / str(every)), device="cpu")
        runs[every] = {r["step"]: r for r in read_log(str(tmp_path / str(every))) if "loss" in r}
    for step in (2, 4):
        for key in ("loss", "task_loss", "train_accuracy"):
            pair = (runs[1][step - 1][key] + runs[1][step][key]) / 2
            assert runs[2][step][key] == pytest.approx(pair, rel=1e-5), (step, key)


def test_the_distillation_term_is_scaled_by_the_temperature_squared(tmp_path, monkeypatch):
    """kd_weight 1: the loss is T²·KL (Hinton et al.), T = 4 here, whatever the KL."""
    model, data = tiny_setup("svd")
    teacher, _ = tiny_setup("svd")
    seen = []
    kl_div = torch.nn.functional.kl_div

    def spy(*args, **kwargs):
        out = kl_div(*args, **kwargs)
        seen.append(float(out.detach()))
        return out

    monkeypatch.setattr(sys.modules["tunecomp.train"].F, "kl_div", spy)
    cfg = TrainConfig(steps=1, batch_size=16, kd_weight=1.0, kd_temperature=4.0, reg="none", log_every=1,
                      progress=False)
    train(model, data.train, data.test, cfg, str(tmp_path), device="cpu", distill_from=teacher)
    record = next(r for r in read_log(str(tmp_path)) if "loss" in r)
    assert len(seen) == 1 and seen[0] > 0
    assert record["loss"] == pytest.approx(16.0 * seen[0], rel=1e-5)


def test_n_m_pruning_is_refused_before_training_where_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="prune must be a multiple of 1/4 with prune_mode 'n:m'.* got 0.3"):
        TrainConfig(prune=0.3, prune_mode="n:m").resolved()
    data = load_dataset("digits", image_size=8, classes=[0, 1, 2, 3, 4])
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY)
    prepare(model, rank=6, init="svd")  # not a multiple of 4
    cfg = TrainConfig(steps=4, batch_size=16, prune=0.5, prune_mode="n:m", progress=False)
    with pytest.raises(ValueError, match=r"in_features and the rank: both must be multiples of 4 .*rank \d+"):
        train(model, data.train, data.test, cfg, str(tmp_path), device="cpu")
    assert not (tmp_path / "log.jsonl").exists()  # refused before the first step


def test_position_embedding_and_class_token_get_no_weight_decay(tmp_path, monkeypatch):
    """timm names what takes no weight decay (model.no_weight_decay()): honoured, as timm's
    own optimiser factory does; the other matrices still decay."""
    groups = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda param_groups, **kw: groups.append(param_groups) or adamw(param_groups, **kw))
    model, data = tiny_setup("svd")
    train(model, data.train, data.test, TrainConfig(steps=1, batch_size=8, progress=False), str(tmp_path), device="cpu")
    decayed = {id(p) for g in groups[0] if g["weight_decay"] > 0 for p in g["params"]}
    assert model.pos_embed.dim() >= 2 and id(model.pos_embed) not in decayed and id(model.cls_token) not in decayed
    assert id(model.head.weight) in decayed and id(model.patch_embed.proj.weight) in decayed
