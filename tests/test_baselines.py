"""The comparison pipelines: each runs under the shared budget and lands at the same size."""

import pytest
import timm
import torch

from tunecomp.baselines import METHODS, Budget, PCLoRALinear, run_method
from tunecomp.data import load_dataset

TINY = {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def setup():
    data = load_dataset("digits", image_size=8, classes=[0, 1, 2])
    torch.manual_seed(0)
    pretrained = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY).state_dict()

    def make_model():
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **TINY)
        model.load_state_dict(pretrained)
        return model

    return data, make_model


def test_every_method_runs_and_matches_the_parameter_budget(setup, tmp_path):
    data, make_model = setup
    budget = Budget(steps=12, level=0.5, rho=0.5, batch_size=16, calib_batches=1)
    results = {m: run_method(m, make_model, data, budget, str(tmp_path / m)) for m in METHODS}
    dense = sum(p.numel() for p in make_model().parameters())
    params = [r["effective_params"] for r in results.values()]
    assert all(p < dense for p in params)
    assert max(params) <= 1.08 * min(params)  # same budget, up to rank/pruning rounding
    for r in results.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 12


def test_pc_lora_layer_starts_as_the_linear_and_drops_the_teacher():
    linear = torch.nn.Linear(12, 10)
    layer = PCLoRALinear(linear, rank=3)
    x = torch.randn(4, 12)
    assert torch.allclose(layer(x), linear(x), atol=1e-6)  # B = 0, lambda = 1
    layer.set_lambda(0.0)
    assert layer.teacher_weight is None
    assert torch.allclose(layer(x), linear.bias.expand(4, 10), atol=1e-6)  # only B·A·x + b, B = 0


def test_unknown_method(setup, tmp_path):
    data, make_model = setup
    with pytest.raises(ValueError, match="method must be one of"):
        run_method("prune-only", make_model, data, Budget(steps=2), str(tmp_path))
