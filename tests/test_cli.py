"""The command line, run as a user would."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from tunecomp.cli import load_timm_model, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tunecomp", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for words in ("tunecomp", "torch", "backends on cpu", "torch   available"):
        assert words in result.stdout


def test_compress_on_digits(tmp_path):
    kwargs = json.dumps({"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, **json.loads(kwargs))
    weights = tmp_path / "pretrained.pth"
    torch.save(source.state_dict(), weights)
    out = tmp_path / "run"
    result = run_cli("compress", "--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs,
                     "--pretrained-file", str(weights), "--dataset", "digits", "--classes", "0,1,2",
                     "--steps", "12", "--batch-size", "16", "--param-ratio", "0.5", "--prune", "0.3",
                     "--decay-steps", "6", "--calib-batches", "2", "--num-workers", "0",
                     "--checkpoint-every", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_after"] < summary["params_before"] and summary["compression_ratio"] > 1
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["replaced_layers"] == 4
    assert "accuracy" in result.stdout and "layers replaced" in result.stdout
    for name in ("model.safetensors", "model.json", "log.jsonl", "checkpoint.pt", "training.png"):
        assert (out / name).is_file(), name
    from safetensors.torch import load_file
    state = load_file(out / "model.safetensors")
    assert not any(k.endswith("teacher_weight") for k in state)  # the compact model only
    assert state["blocks.0.mlp.fc1.mask_u"].dtype == torch.bool

    # a finished run is not overwritten by another compress, nor by an export into it
    result = run_cli("compress", "--dataset", "digits", "--out", str(out), "--steps", "1")
    assert result.returncode == 2 and "already holds a run" in result.stderr and "--resume" in result.stderr
    result = run_cli("export", "--run", str(out), "--out", str(out))
    assert result.returncode == 2 and "would overwrite its model.safetensors" in result.stderr
    assert load_file(out / "model.safetensors").keys() == state.keys()

    # the run exports to the compact format, which loads and benchmarks against the original
    exported = tmp_path / "exported"
    result = run_cli("export", "--run", str(out), "--out", str(exported))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported 4 low-rank layers" in result.stdout
    from tunecomp.cli import rebuild_run
    from tunecomp.deploy import load
    trained, _ = rebuild_run(str(out))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(load(str(exported))(x), trained(x), rtol=1e-4, atol=1e-5)
    result = run_cli("export", "--run", str(out), "--out", str(tmp_path / "measured"), "--measure",
                     "--device", "cpu", "--dtype", "bfloat16")  # forms chosen by timing, in bf16
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported 4 low-rank layers" in result.stdout
    assert "export: 100%" in result.stderr and "4/4" in result.stderr, result.stderr[-3000:]  # progress bar
    assert torch.allclose(load(str(tmp_path / "measured"))(x), trained(x), rtol=1e-4, atol=1e-5)
    result = run_cli("bench-model", str(exported), "--batch", "1,2", "--repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compressed") == 2 and "speed-up" in result.stdout
    for line in ("dense batch 1:", "dense batch 2:", "compressed batch 1:", "compressed batch 2:"):
        assert f"bench-model: {line}" in result.stderr, result.stderr[-3000:]  # progress, point by point
    if os.path.exists("/proc/self/clear_refs"):
        assert "n/a" not in result.stdout  # peak memory measured on the CPU too


def test_compress_baseline_method(tmp_path):
    kwargs = json.dumps({"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    out = tmp_path / "svdft"
    result = run_cli("compress", "--method", "svd-ft", "--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs,
                     "--dataset", "digits", "--classes", "0,1", "--steps", "4", "--batch-size", "16",
                     "--param-ratio", "0.5", "--prune", "0.5", "--calib-batches", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "svd-ft" and summary["level"] == 0.25 and summary["effective_params"] > 0
    # the training flags a baseline's own schedule would not use are refused, not dropped
    result = run_cli("compress", "--method", "ft-svd", "--dataset", "digits", "--param-ratio", "0.5",
                     "--out", str(tmp_path / "other"), "--resume", "--warmup-steps", "7")
    assert result.returncode == 2, result.stderr
    assert "--method ft-svd runs its own schedule (tunecomp.baselines) and would ignore --warmup-steps, --resume" \
        in result.stderr.replace("\n", " ").replace("  ", " "), result.stderr


def test_export_and_bench_errors(tmp_path):
    result = run_cli("export", "--run", str(tmp_path), "--out", str(tmp_path / "x"))
    assert result.returncode != 0 and "has no model.json" in result.stderr
    for batch, words in (("1,a", "must be an integer; got 'a'"), ("0", "must be at least 1; got 0")):
        result = run_cli("bench-model", str(tmp_path), "--batch", batch)
        assert result.returncode == 2 and f"argument --batch: {words}" in result.stderr, result.stderr
    result = run_cli("bench-model", str(tmp_path))  # checked before any timing starts
    assert result.returncode == 2 and "holds no manifest.json" in result.stderr
    assert "Traceback" not in result.stderr and "TUNECOMP_TRACEBACK=1" in result.stderr


def test_compress_bad_arguments(tmp_path):
    result = run_cli("compress", "--dataset", "digits")
    assert result.returncode == 2 and "--out" in result.stderr
    # each a usage error naming the flag, the expected and the actual, before any work
    for flags, words in ((("--param-ratio", "0"), "argument --param-ratio: must be in (0, 1]; got 0.0"),
                         (("--model-kwargs", "{bad"), "argument --model-kwargs: not valid JSON"),
                         (("--model-kwargs", "[1]"), "argument --model-kwargs: must be a JSON object"),
                         (("--classes", "5,5,6"), "argument --classes: repeats [5]"),
                         (("--eval-every", "-1"), "argument --eval-every: must be at least 0; got -1"),
                         (("--seed", "100000000000"), "argument --seed: must be in [0, 2147483647]; got 100000000000"),
                         (("--targets", "attn.qkv,,mlp.fc1"), "argument --targets: an empty name in 'attn.qkv,,mlp.fc1'"),
                         (("--reg-weight", "-1"), "argument --reg-weight: must be in [0, inf]; got -1.0"),
                         (("--prune-mode", "n:m", "--prune", "0.75"), "prune must be at most 0.5 with prune_mode 'n:m'")):
        result = run_cli("compress", "--dataset", "digits", "--out", str(tmp_path / "x"), *flags)
        assert result.returncode == 2 and words in result.stderr, (flags, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    result = run_cli("compress", "--dataset", "cifar100", "--data-dir", "/nonexistent", "--out", str(tmp_path / "y"),
                     "--model", "vit_tiny_patch16_224")
    assert result.returncode != 0 and "CIFAR-100 not found" in result.stderr
    tiny = {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 3}
    result = run_cli("compress", "--dataset", "digits", "--out", str(tmp_path / "z"), "--model", "vit_tiny_patch16_224",
                     "--model-kwargs", json.dumps(tiny))  # was silently replaced by the data's 10
    assert result.returncode == 2 and "Traceback" not in result.stderr  # a usage error, as the others
    assert "num_classes comes from the data (10 classes of digits); got 3 in --model-kwargs" in result.stderr


def test_targets_are_one_setting_however_spaced():
    from tunecomp.cli import _targets

    assert _targets(" attn.qkv , mlp.fc1") == _targets("attn.qkv,mlp.fc1") == "attn.qkv,mlp.fc1"


def test_demo_runs_and_prints_the_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "6"]) == 0
    out = capsys.readouterr().out
    for words in ("dense fine-tune (teacher)", "TuneComp, linear params x0.5, rho=0.5", "ratio"):
        assert words in out


def test_pretrained_file_is_loaded(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = load_timm_model("vit_tiny_patch16_224", str(path), depth=1)
    assert torch.equal(loaded.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    # the head starts afresh even where the file's fits (1000 classes, which timm then loads),
    # from the global seed as without a file
    assert not torch.equal(loaded.head.weight, source.head.weight)
    heads = []
    for _ in range(2):
        torch.manual_seed(7)
        heads.append(load_timm_model("vit_tiny_patch16_224", str(path), depth=1).head.weight)
    assert torch.equal(*heads)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_timm_model("vit_tiny_patch16_224", str(tmp_path / "missing.pth"))
    # names that do not match the model's: timm would load nothing (non-strictly, with a
    # new head) and leave the model random; that is an error, not a warning in a log
    torch.save({f"backbone.{k}": t for k, t in source.state_dict().items()}, path)
    with pytest.raises(ValueError, match="none of vit_tiny_patch16_224's weights were loaded"):
        load_timm_model("vit_tiny_patch16_224", str(path), depth=1, num_classes=3)


def test_model_and_weights_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'vit_tiny_patch16_22' is not a timm model; did you mean vit_tiny_patch16_224"):
        load_timm_model("vit_tiny_patch16_22")
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224 cannot be built with kwargs \{'foo': 1\}"):
        load_timm_model("vit_tiny_patch16_224", None, foo=1)
    for kwargs in ({"num_heads": 0}, {"embed_dim": -1}):  # ZeroDivisionError, RuntimeError in timm
        with pytest.raises(ValueError, match=r"vit_tiny_patch16_224 cannot be built with kwargs"):
            load_timm_model("vit_tiny_patch16_224", None, **kwargs)
    from tunecomp.cli import model_input

    model = load_timm_model("vit_tiny_patch16_224", None, img_size=(8, 16), patch_size=4, depth=1)
    with pytest.raises(ValueError, match=r"img_size must be square.*got \(8, 16\) \(from --model-kwargs\)"):
        model_input(model)
    model = load_timm_model("vit_tiny_patch16_224", None, in_chans=1, img_size=16, patch_size=4, depth=1)
    with pytest.raises(ValueError, match=r"in_chans must be 3: the data loaders make RGB images; got 1"):
        model_input(model)  # before: a shape error mid-run (or a traceback with --init svd)
    not_weights = tmp_path / "weights.safetensors"
    not_weights.write_bytes(b"\xff" * 64)
    other_size = tmp_path / "other.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=48).state_dict(), other_size)
    for path in (not_weights, other_size):
        with pytest.raises(ValueError, match=f"--pretrained-file '{path}' cannot be loaded into vit_tiny_patch16_224"):
            load_timm_model("vit_tiny_patch16_224", str(path), depth=1)


def test_device_mistakes_are_usage_errors(tmp_path, capsys):
    flags = ["--dataset", "digits", "--out", str(tmp_path / "x")]
    cases = [("bogus", "must be a device such as cpu, cuda or cuda:1; got 'bogus'")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "'cuda': CUDA is not available here"))
    for device, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["compress", *flags, "--device", device])
        assert exit_info.value.code == 2
        assert f"argument --device: {words}" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written
    (tmp_path / "afile").write_text("")
    assert main(["compress", "--dataset", "digits", "--out", str(tmp_path / "afile")]) == 2
    assert f"--out {tmp_path / 'afile'} is a file; give a directory" in capsys.readouterr().err


def test_compress_is_reproducible_and_resume_refuses_other_data(tmp_path, capsys):
    kwargs = json.dumps({"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    flags = ["compress", "--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs, "--dataset", "digits",
             "--classes", "0,1,2", "--steps", "3", "--batch-size", "16", "--calib-batches", "1",
             "--num-workers", "0", "--seed", "3"]
    assert main([*flags, "--out", str(tmp_path / "a")]) == 0
    torch.manual_seed(99)  # the global generator elsewhere: --seed alone decides
    assert main([*flags, "--out", str(tmp_path / "b")]) == 0
    a, b = ((tmp_path / run / "model.safetensors").read_bytes() for run in ("a", "b"))
    assert a == b  # the random head and every other init come from --seed
    assert json.loads((tmp_path / "a" / "run.json").read_text())["classes"] == [0, 1, 2]
    capsys.readouterr()
    flags[flags.index("0,1,2")] = "2,1,0"  # the same classes, other labels: another task
    assert main([*flags, "--out", str(tmp_path / "a"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "resume: " in err and "classes [0, 1, 2] -> [2, 1, 0]" in err and "Traceback" not in err
    (tmp_path / "a" / "run.json").write_text("{")
    assert main([*flags, "--out", str(tmp_path / "a"), "--resume"]) == 2
    assert f"--resume: {tmp_path / 'a' / 'run.json'} is not valid JSON" in capsys.readouterr().err


def test_a_run_that_stopped_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    """A log without a checkpoint (a crash before the first) is nothing to resume: --resume
    says so before any work, and a new run in the same --out starts afresh."""
    kwargs = json.dumps({"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # cut off by the crash
    flags = ["compress", "--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs, "--dataset", "digits",
             "--classes", "0,1", "--steps", "2", "--batch-size", "16", "--calib-batches", "1",
             "--num-workers", "0", "--out", str(out)]
    assert main([*flags, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint.pt in --out {out}: nothing to resume" in err
    assert main([*flags[:-1], str(tmp_path / "elsewhere"), "--resume"]) == 2  # a mistyped --out
    assert not (tmp_path / "elsewhere").exists()  # refused before anything is made
    capsys.readouterr()
    assert main(flags) == 0
    assert "holds the log of a run that stopped before its first checkpoint: starting afresh" in capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [2] and (out / "checkpoint.pt").is_file()  # a fresh log


def test_export_of_a_damaged_run_names_the_file(tmp_path, capsys):
    kwargs = json.dumps({"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    run = tmp_path / "run"
    assert main(["compress", "--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs, "--dataset", "digits",
                 "--classes", "0,1", "--steps", "2", "--batch-size", "16", "--init", "svd", "--num-workers", "0",
                 "--out", str(run)]) == 0
    weights = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "e1")]) == 2
    assert f"{run / 'model.safetensors'} cannot be loaded into the model" in capsys.readouterr().err
    (run / "model.json").write_text('{"model": "vit_tiny_patch16_224", "kwargs": {')
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "e2")]) == 2
    assert f"{run / 'model.json'} does not describe a model that can be rebuilt" in capsys.readouterr().err


def test_json_outputs_are_replaced_whole(tmp_path):
    """run.json, model.json, summary.json (and an export's manifest) go through a temporary
    file and a rename: a failure while writing leaves the old file whole and no temporary
    behind."""
    from tunecomp.deploy import write_json

    path = tmp_path / "summary.json"
    write_json(str(path), {"accuracy": 0.5})
    with pytest.raises(TypeError):
        write_json(str(path), {"accuracy": 0.9, "bad": {1, 2}})  # a set: json.dump fails midway
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_export_overwrite_flag_and_bench_model_points(tmp_path, capsys, monkeypatch):
    """export refuses to write over an export unless --overwrite, and --device/--dtype
    without --measure; bench-model compiles each model per batch size (dynamo's recompile
    limit would run later sizes uncompiled), records an out-of-memory point and goes on, and
    refuses an export that names no timm architecture."""
    from tunecomp import cli, deploy, replace_linear_layers

    kwargs = json.dumps({"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2})
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["compress", "--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs, "--dataset", "digits",
                 "--classes", "0,1", "--steps", "2", "--batch-size", "16", "--init", "svd", "--num-workers", "0",
                 "--out", str(run)]) == 0
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "already holds model.safetensors and manifest.json: pass overwrite=True (tunecomp export --overwrite)" \
        in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--out", str(out), "--overwrite"]) == 0
    for flag in (["--device", "cpu"], ["--dtype", "float16"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "--run", str(run), "--out", str(tmp_path / "x"), *flag])
        assert exit_info.value.code == 2
        assert "--device and --dtype choose where --measure times the forms; give --measure too" in capsys.readouterr().err

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    real_time_forward = deploy.time_forward

    def time_forward(module, x, repeats):
        if x.shape[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return real_time_forward(module, x, repeats)

    monkeypatch.setattr(deploy, "time_forward", time_forward)
    rows = cli._bench_one(str(out), "compressed", [1, 3, 2], "cpu", torch.float32, True, 1)
    assert len(compiled) == 3 and all(kw == {"dynamic": False} for kw in compiled)
    assert [(r["batch"], r.get("error"), r["latency_ms"] is None) for r in rows] == \
        [(1, None, False), (3, "out of memory", True), (2, None, False)]
    cli._print_bench([{**r, "model": "dense"} for r in rows] + rows)
    printed = capsys.readouterr().out
    assert printed.count("out of memory") == 2 and printed.count("1.00x") == 4
    monkeypatch.setattr(deploy, "time_forward", lambda *a: pytest.fail("refused after timing"))
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))  # no pretrained_cfg: no arch
    replace_linear_layers(plain, rank=2, targets=("0",), keep_teacher=False)
    deploy.export(plain, str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="manifest names no timm architecture: bench-model needs one"):
        cli.bench_model(str(tmp_path / "plain"), [1], "cpu", torch.float32, False)
