import pytest
import torch

from tunecomp import FusedPrunedLowRankLinear
from tunecomp.prune import prune_, sparsity_penalty


def layers(*shapes):
    return [FusedPrunedLowRankLinear(k, m, r) for k, m, r in shapes]


def pruned_fraction(group):
    total = sum(l.mask_u.numel() + l.mask_v.numel() for l in group)
    return sum(int((~l.mask_u).sum() + (~l.mask_v).sum()) for l in group) / total


def test_n_m_prunes_the_smallest_of_each_group_and_floors_the_ratio():
    """Each group of 4 along the reduction dim loses its smallest magnitudes, as many as the
    ratio floored to a multiple of 1/4 (0.45 -> 1 of 4: the training ramp passes through such
    ratios, e.g. 0.375, on its way to 0.5)."""
    for ratio, kept in ((0.5, 2), (0.45, 3)):
        layer = FusedPrunedLowRankLinear(32, 24, 8)
        prune_([layer], ratio, mode="n:m")
        for weight, mask in ((layer.v.detach().abs().reshape(8, 4, 8), layer.mask_v.reshape(8, 4, 8)),
                             (layer.u.detach().abs().reshape(24, 2, 4), layer.mask_u.reshape(24, 2, 4))):
            axis = 1 if weight.shape[1] == 4 else 2  # V: groups along in; U: along the rank
            assert torch.all(mask.sum(axis) == kept), ratio
            kept_min = torch.where(mask, weight, torch.inf).amin(axis)
            pruned_max = torch.where(~mask, weight, -torch.inf).amax(axis)
            assert torch.all(pruned_max <= kept_min), ratio


def test_global_scope_leaves_every_factor_an_entry():
    """One threshold over layers of scales 100x apart pruned the small layer's factors whole
    (its output was then its bias). Each factor now keeps its largest entry; the total pruned
    is still exactly the ratio's."""
    group = layers((16, 16, 8), (16, 16, 8), (16, 16, 8))
    with torch.no_grad():
        group[1].u.mul_(0.01)
        group[1].v.mul_(0.01)
    n = sum(l.mask_u.numel() + l.mask_v.numel() for l in group)
    for ratio in (0.4, 0.6):
        prune_(group, ratio, scope="global")
        assert sum(int((~l.mask_u).sum() + (~l.mask_v).sum()) for l in group) == round(ratio * n)
        for layer in group:
            for weight, mask in ((layer.u, layer.mask_u), (layer.v, layer.mask_v)):
                assert int(mask.sum()) >= 1 and mask.view(-1)[weight.detach().abs().argmax()]
    assert int(group[1].mask_u.sum()) == int(group[1].mask_v.sum()) == 1  # all but the largest


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_exact_ratio_smallest_first_and_monotone(scope):
    group = layers((24, 40, 8), (16, 12, 5))
    prune_(group, 0.3, scope=scope)
    if scope == "layer":  # each factor of each layer exactly
        for layer in group:
            for mask in (layer.mask_u, layer.mask_v):
                assert int((~mask).sum()) == round(0.3 * mask.numel())
    else:
        n = sum(l.mask_u.numel() + l.mask_v.numel() for l in group)
        assert pruned_fraction(group) == pytest.approx(round(0.3 * n) / n)
    pools = ([[(l.u, l.mask_u)] for l in group] + [[(l.v, l.mask_v)] for l in group] if scope == "layer"
             else [[(l.u, l.mask_u) for l in group] + [(l.v, l.mask_v) for l in group]])
    for pool in pools:  # every pruned magnitude <= every kept one, within a pool
        w = torch.cat([t.detach().flatten() for t, _ in pool]).abs()
        m = torch.cat([mask.flatten() for _, mask in pool])
        assert w[~m].max() <= w[m].min()
    before = [(l.mask_u.clone(), l.mask_v.clone()) for l in group]
    with torch.no_grad():  # grow pruned entries: they must stay pruned
        for l in group:
            l.u[~l.mask_u] = 100.0
    prune_(group, 0.6, scope=scope)
    for l, (mu, mv) in zip(group, before):
        assert not torch.any(l.mask_u & ~mu) and not torch.any(l.mask_v & ~mv)
    assert pruned_fraction(group) == pytest.approx(0.6, abs=0.01)
    snapshot = [l.mask_u.clone() for l in group]
    prune_(group, 0.2, scope=scope)  # a lower ratio revives nothing
    assert all(torch.equal(l.mask_u, s) for l, s in zip(group, snapshot))


def test_rank_mode_prunes_weakest_components():
    layer = FusedPrunedLowRankLinear(24, 40, 8)
    with torch.no_grad():
        layer.u[:, 3] *= 1e-3  # component 3 is by far the weakest
    prune_([layer], 0.25, mode="rank")  # 2 of 8
    dead = ~layer.mask_u.any(0)
    assert int(dead.sum()) == 2 and dead[3]
    assert torch.equal(~layer.mask_u.any(0), ~layer.mask_v.any(0))  # whole columns
    assert bool(layer.mask_u[:, ~dead].all())


def test_n_m_pattern_along_reduction_dims():
    layer = FusedPrunedLowRankLinear(32, 24, 8)
    prune_([layer], 0.5, mode="n:m")
    # V [in, r]: groups of 4 consecutive rows in each column keep exactly 2
    assert torch.all(layer.mask_v.reshape(8, 4, 8).sum(1) == 2)
    # U [out, r]: groups of 4 consecutive columns in each row keep exactly 2
    assert torch.all(layer.mask_u.reshape(24, 2, 4).sum(-1) == 2)
    half = FusedPrunedLowRankLinear(32, 24, 8)
    prune_([half], 0.3, mode="n:m")  # floored to 1/4
    assert torch.all(half.mask_v.reshape(8, 4, 8).sum(1) == 3)
    with pytest.raises(ValueError, match=r"ratio for 2:4 pruning must be in \[0, 0.5\]"):
        prune_([layer], 0.75, mode="n:m")
    with pytest.raises(ValueError, match="multiple of m=4"):
        prune_([FusedPrunedLowRankLinear(30, 24, 8)], 0.5, mode="n:m")


def test_bad_arguments():
    group = layers((8, 8, 2))
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\); got 1.0"):
        prune_(group, 1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        prune_(group, 0.1, mode="random")
    with pytest.raises(ValueError, match="scope must be one of"):
        prune_(group, 0.1, scope="model")
    with pytest.raises(ValueError, match="rank pruning works per layer"):
        prune_(group, 0.1, mode="rank", scope="global")
    with pytest.raises(TypeError, match="ratio must be a float in \\[0, 1\\); got str"):
        prune_(group, "0.5")
    with pytest.raises(TypeError, match="m must be an int; got float 4.0"):
        prune_(group, 0.5, mode="n:m", m=4.0)
    with pytest.raises(ValueError, match=r"needs the rank \(U's reduction dim\) to be a multiple of m=4; got 6"):
        prune_(layers((8, 8, 6)), 0.5, mode="n:m")
    with pytest.raises(ValueError, match=r"needs in_features \(V's reduction dim\) to be a multiple of m=4; got 6"):
        prune_(layers((6, 8, 4)), 0.5, mode="n:m")
    # a refused layer anywhere in the list: no mask of any layer changed
    group = layers((8, 8, 8), (8, 8, 6))
    with pytest.raises(ValueError, match=r"multiple of m=4; got 6"):
        prune_(group, 0.5, mode="n:m")
    assert all(bool(layer.mask_u.all()) and bool(layer.mask_v.all()) for layer in group)
    prune_([], 0.5, scope="global")  # nothing to prune, as in layer scope


@pytest.mark.parametrize("mode, scope", [("unstructured", "layer"), ("unstructured", "global"), ("rank", "layer")])
def test_a_ratio_below_1_never_prunes_everything(mode, scope):
    """round(0.95 * 10) = 10 of 10 would leave the layer its bias alone: at most all but one."""
    group = layers((10, 10, 10)) if mode == "rank" else layers((1, 2, 1))
    prune_(group, 0.95, mode=mode, scope=scope)
    layer = group[0]
    if mode == "rank":
        assert int((layer.mask_u.any(0) & layer.mask_v.any(0)).sum()) == 1
    else:  # u [2, 1] and v [1, 1]: one entry of u stays, v's only one too (global: each
        # factor keeps its largest entry, so 1 of round(2.85) = 3 is pruned)
        assert int(layer.mask_u.sum()) == 1 and int(layer.mask_v.sum()) == 1


def test_sparsity_penalty_values_and_gradients():
    layer = FusedPrunedLowRankLinear(6, 5, 3)
    layer.mask_u[0] = False
    l1 = sparsity_penalty([layer])
    expected = (layer.u[layer.mask_u].abs().sum() + layer.v.abs().sum()) / (15 + 18)
    assert l1.item() == pytest.approx(expected.item())
    l1.backward()
    assert torch.all(layer.u.grad[0] == 0) and torch.equal(layer.v.grad, torch.sign(layer.v.detach()) / 33)
    group = sparsity_penalty([layer], mode="rank")
    assert group.item() == pytest.approx(((torch.where(layer.mask_u, layer.u, 0).norm(dim=0).sum() + layer.v.norm(dim=0).sum()) / 3).item())
