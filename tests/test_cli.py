"""The command line: info and demo, run as a user would."""

import subprocess
import sys

import pytest
import timm
import torch

from tunecomp.cli import demo, load_timm_model, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tunecomp", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for words in ("tunecomp", "torch", "backends on cpu", "torch   available"):
        assert words in result.stdout


def test_demo_full_rank_reproduces_and_smaller_ranks_shrink(capsys):
    rows = demo("vit_tiny_patch16_224", None, [1.0, 0.25], batch=2, seed=0)
    full, quarter = rows
    assert full["logit_rel_error"] < 1e-4
    assert quarter["linear_params"] < 0.4 * quarter["linear_params_before"]
    assert quarter["model_params"] < full["model_params"]
    assert main(["demo", "--rank-ratios", "0.5", "--batch", "1"]) == 0
    assert "rank ratio" in capsys.readouterr().out


def test_demo_rejects_bad_ratios():
    result = run_cli("demo", "--rank-ratios", "0,2")
    assert result.returncode == 2 and "ratios must be in (0, 1]" in result.stderr


def test_pretrained_file_is_loaded(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = load_timm_model("vit_tiny_patch16_224", str(path), depth=1)
    assert torch.equal(loaded.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_timm_model("vit_tiny_patch16_224", str(tmp_path / "missing.pth"))
