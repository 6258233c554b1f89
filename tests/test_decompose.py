"""Initialisations: plain SVD, ASVD scaling, SVD-LLM whitening."""

import pytest
import torch
from torch import nn

from conftest import rel_error
from tunecomp import FusedPrunedLowRankLinear, replace_linear_layers
from tunecomp.decompose import CalibStats, collect_stats, init_factors


def anisotropic_inputs(tokens, k, dead=0):
    """Inputs whose channels differ in scale by 100x (as activations of real models do)."""
    scale = torch.logspace(-1, 1, k)
    if dead:
        scale[:dead] = 0.0
    return torch.randn(tokens, k) * scale


def stats_of(x):
    s = CalibStats(torch.zeros(x.shape[1], x.shape[1]), torch.zeros(x.shape[1]))
    s.update(x)
    return s


def output_error(w, u, v, x):
    return rel_error(x @ (u @ v.T).T, x @ w.T)


@pytest.mark.parametrize("init", ["svd", "asvd", "whiten"])
def test_full_rank_is_exact(init):
    w = torch.randn(20, 16)
    x = anisotropic_inputs(64, 16)
    u, v = init_factors(w, 16, init, None if init == "svd" else stats_of(x))
    assert rel_error(u @ v.T, w) < 1e-5


def test_activation_aware_beats_plain_svd_on_output_error():
    w = torch.randn(48, 32)
    x = anisotropic_inputs(256, 32)
    stats = stats_of(x)
    errors = {init: output_error(w, *init_factors(w, 8, init, None if init == "svd" else stats), x)
              for init in ("svd", "asvd", "whiten")}
    # whitening is the optimum of the output error at this rank: nothing can beat it
    assert errors["whiten"] <= errors["asvd"] + 1e-6 and errors["whiten"] <= errors["svd"] + 1e-6
    assert errors["whiten"] < 0.8 * errors["svd"]


@pytest.mark.parametrize("outlier", [1.0, 1e2, 1e4])
def test_whitening_is_the_optimal_output_error_with_an_outlier_channel(outlier):
    """In float64 the whitened factors reach the optimum of ||x·(W − U·Vᵀ)ᵀ|| at their rank (the
    best rank-r approximation of x·Wᵀ), with one input channel `outlier` times the others (as
    in ViT activations) and a dead one. Regularising every channel by the outlier's scale once
    took 1.5x the optimum at 1e4."""
    w = torch.randn(40, 32, dtype=torch.float64)
    x = torch.randn(200, 32, dtype=torch.float64) * torch.logspace(-1, 1, 32, dtype=torch.float64)
    x[:, 5] *= outlier
    x[:, 9] = 0.0
    rank = 6
    u, v = init_factors(w, rank, "whiten", stats_of(x))
    target = x @ w.T
    optimum = torch.linalg.svdvals(target)[rank:].norm() / target.norm()
    assert output_error(w, u, v, x) <= optimum * (1 + 1e-6)


@pytest.mark.parametrize("init", ["svd", "asvd", "whiten"])
def test_factors_are_balanced(init):
    w = torch.randn(24, 16)
    x = anisotropic_inputs(64, 16) * 30.0  # large activations push V's scale far from U's
    u, v = init_factors(w, 6, init, None if init == "svd" else stats_of(x))
    assert torch.allclose(u.norm(dim=0), v.norm(dim=0), rtol=1e-4)


def test_rank_deficient_statistics_are_regularised():
    w = torch.randn(24, 32)
    x = anisotropic_inputs(10, 32, dead=4)  # 10 tokens < 32 channels, 4 dead channels
    stats = stats_of(x)
    errors = {}
    for init in ("svd", "asvd", "whiten"):
        u, v = init_factors(w, 8, init, stats)
        assert torch.isfinite(u).all() and torch.isfinite(v).all()
        errors[init] = output_error(w, u, v, x)
    # The statistics still count: each activation-aware init fits the inputs seen better than
    # the plain SVD, which ignores them; whitening, exact on their (<= 10-dim) span up to the
    # regularisation, much better (seen: svd 0.42-0.65, asvd 0.19-0.28, whiten 0.07-0.10).
    assert errors["asvd"] < errors["svd"], errors
    assert errors["whiten"] < min(0.2, errors["asvd"]), errors


def test_collect_stats_and_activation_aware_surgery():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    batches = [anisotropic_inputs(20, 16) for _ in range(3)]
    stats = collect_stats(model, batches, ["0", "2"])
    assert stats["0"].tokens == 60
    x = torch.cat(batches)
    assert rel_error(stats["0"].gram, x.T @ x) < 1e-6
    assert rel_error(stats["0"].abs_mean, x.abs().mean(0)) < 1e-6
    with torch.no_grad():
        expected = model(x)
        report = replace_linear_layers(model, rank=6, targets=["0", "2"], init="whiten", calib=stats, keep_teacher=False)
        assert len(report.layers) == 2 and isinstance(model[0], FusedPrunedLowRankLinear)
        assert rel_error(model(x), expected) < 0.5


def test_collect_stats_stops_at_max_batches_and_keeps_the_models_mode():
    model = nn.Sequential(nn.Linear(4, 4))
    batches = [torch.randn(5, 4) for _ in range(3)]
    assert collect_stats(model, batches, ["0"], max_batches=2)["0"].tokens == 10
    for training in (False, True):
        model.train(training)
        collect_stats(model, batches, ["0"])
        assert model.training == training


def test_init_errors():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="init='whiten' needs calib=CalibStats"):
        init_factors(w, 2, "whiten")
    with pytest.raises(ValueError, match="init must be one of"):
        init_factors(w, 2, "pca")
    with pytest.raises(ValueError, match="calib was collected for 5 input channels; the weight has 6"):
        init_factors(w, 2, "asvd", stats_of(torch.randn(4, 5)))
    with pytest.raises(ValueError, match=r"weight must be a 2-D tensor \[out_features, in_features\]; got \(8,\)"):
        init_factors(torch.randn(8), 2, "whiten", stats_of(torch.randn(4, 5)))  # before: IndexError
    import numpy as np

    u, v = init_factors(w, np.int64(3), "svd")  # a numpy int is an int (before: TypeError)
    assert u.shape == (8, 3) and v.shape == (6, 3)
    with pytest.raises(ValueError, match="no calibration tokens"):
        collect_stats(nn.Sequential(nn.Linear(4, 4)), [], ["0"])
    batch = torch.randn(3, 4)
    batch[1, 2] = float("nan")  # would fail in the factorisation (asvd: LinAlgError)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"calibration inputs of \['0', '2'\] hold NaN or inf"):
        collect_stats(model, [batch], ["0", "2"])


def test_collect_stats_takes_one_tensor_as_one_batch_in_any_dtype():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(7, 6, dtype=torch.float64)
    one = collect_stats(model, x, ["0", "2"])  # a tensor: one batch of 7, cast to float32
    listed = collect_stats(model, [(x.float(), torch.zeros(7))], ["0", "2"])
    for name in ("0", "2"):
        assert one[name].tokens == listed[name].tokens == 7
        assert torch.equal(one[name].gram, listed[name].gram)
    with pytest.raises(ValueError, match=r"calibration batch 0 of shape \(7, 4\) does not fit the model"):
        collect_stats(model, torch.randn(7, 4), ["0"])
    with pytest.raises(TypeError, match="calibration batch 1 must be a tensor"):
        collect_stats(model, [x, "images"], ["0"])
    with pytest.raises(ValueError, match="calib has no statistics"):
        replace_linear_layers(nn.Sequential(nn.Linear(4, 4)), rank=2, targets=["0"], init="asvd", calib={})
