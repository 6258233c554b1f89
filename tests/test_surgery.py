"""surgery: find and swap linear layers, on timm ViTs and plain modules."""

import pytest
import timm
import torch
from torch import nn

from conftest import rel_error
from tunecomp import FusedPrunedLowRankLinear, replace_linear_layers
from tunecomp.surgery import DEFAULT_TARGETS, rank_for


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_224"])
def test_full_rank_vit_gives_the_same_logits(name):
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match=f"{4 * len(model.blocks)} of {4 * len(model.blocks)} layers got factors larger"):
        report = replace_linear_layers(model, rank_ratio=1.0, keep_teacher=False)  # full rank: larger
    depth = len(model.blocks)
    assert len(report.layers) == 4 * depth
    replaced = [m for m in model.modules() if isinstance(m, FusedPrunedLowRankLinear)]
    assert len(replaced) == 4 * depth
    assert type(model.head) is nn.Linear  # the classifier is left alone
    with torch.no_grad():
        logits = model(x)
    # fp32 factors from a float64 SVD; 12 blocks of rounding, each ~1e-7 relative
    assert rel_error(logits, expected) < 1e-4


def test_teacher_attached_model_is_unchanged_until_alpha_moves():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        replace_linear_layers(model, rank=8)  # heavy truncation, but alpha = 1
        assert rel_error(model(x), expected) < 1e-6
        for layer in model.modules():
            if isinstance(layer, FusedPrunedLowRankLinear):
                layer.alpha = 0.0
        assert rel_error(model(x), expected) > 1e-2  # now the rank-8 students run


def test_report_counts_and_table():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, depth=1)
    report = replace_linear_layers(model, param_ratio=0.25)
    by_name = {layer.name: layer for layer in report.layers}
    assert set(by_name) == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"}
    qkv = by_name["blocks.0.attn.qkv"]  # 192 -> 576
    assert (qkv.in_features, qkv.out_features) == (192, 576)
    assert qkv.rank == (192 * 576 // 4) // (192 + 576)
    assert qkv.params_before == 192 * 576 + 576
    assert qkv.params_after == qkv.rank * (192 + 576) + 576
    assert report.params_before == sum(l.params_before for l in report.layers)
    for layer in report.layers:  # the budget holds for the weights
        assert layer.params_after - layer.out_features <= 0.25 * (layer.params_before - layer.out_features)
    text = str(report)
    assert "blocks.0.mlp.fc1" in text and "4 layers replaced" in text


def test_rank_forms():
    assert rank_for(768, 2304, rank=100) == 100
    assert rank_for(768, 2304, rank=5000) == 768  # capped at full rank
    assert rank_for(768, 2304, rank_ratio=0.25) == 192
    assert rank_for(768, 768, param_ratio=0.5) == 192
    assert rank_for(4, 4, rank_ratio=0.01) == 1
    assert rank_for(768, 3072, param_ratio=0.5) == 307
    assert rank_for(768, 3072, param_ratio=0.5, rank_multiple=4) == 304
    assert rank_for(768, 3072, rank=3, rank_multiple=16) == 16  # at least one multiple
    assert rank_for(6, 6, rank=5, rank_multiple=8) == 6  # at most full rank
    with pytest.raises(ValueError, match="rank_multiple must be a positive int; got 0"):
        rank_for(8, 8, rank=2, rank_multiple=0)
    with pytest.raises(ValueError, match="exactly one of rank, rank_ratio, param_ratio"):
        rank_for(8, 8, rank=2, rank_ratio=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        rank_for(8, 8)
    with pytest.raises(ValueError, match=r"rank_ratio must be in \(0, 1\]; got 1.5"):
        rank_for(8, 8, rank_ratio=1.5)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        rank_for(8, 8, rank=0)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_any_module_glob_targets_and_head():
    model = Plain()
    report = replace_linear_layers(model, rank=4, targets=["encoder.*", "*"])
    assert [l.name for l in report.layers] == ["encoder.0", "encoder.2"]  # head excluded
    assert isinstance(model.encoder[0], FusedPrunedLowRankLinear)
    model = Plain()
    report = replace_linear_layers(model, rank=2, targets="head", include_head=True)
    assert [l.name for l in report.layers] == ["head"]
    assert model(torch.randn(2, 8)).shape == (2, 3)


def test_no_match_is_an_error_that_lists_linears():
    with pytest.raises(ValueError, match="no nn.Linear matches targets .* linear layers here: encoder.0, encoder.2, head"):
        replace_linear_layers(Plain(), rank=2)  # the ViT defaults match nothing here
    with pytest.raises(ValueError, match=r"targets \['encoder.3'\] match no nn.Linear .* here: encoder.0, encoder.2"):
        replace_linear_layers(Plain(), rank=2, targets=["encoder.0", "encoder.3"])  # one of two: still an error
    mlp_only = nn.Sequential(nn.Module(), nn.Linear(8, 8))  # the defaults, as the CLI gives them
    mlp_only[0].mlp = nn.Module()
    mlp_only[0].mlp.fc1 = nn.Linear(8, 8)
    report = replace_linear_layers(mlp_only, rank=2, targets=list(DEFAULT_TARGETS))
    assert [l.name for l in report.layers] == ["0.mlp.fc1"]
    model = Plain()
    report = replace_linear_layers(model, rank=2, targets="encoder.0, encoder.2".split(","))  # spaces as typed
    assert [l.name for l in report.layers] == ["encoder.0", "encoder.2"]


def test_shared_or_tied_linear_layers_are_refused():
    """named_modules() names a module once: one reached under two names was replaced under
    the first only, the dense layer still running under the second; tied weights would
    each get their own factors. Both are refused, naming the layers."""
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"enc": nn.Sequential(shared), "dec": nn.Sequential(shared)})
    with pytest.raises(ValueError, match=r"share one weight .*\['enc.0, dec.0'\]"):
        replace_linear_layers(model, rank=2, targets=["*"])
    assert model["dec"][0] is shared and model["enc"][0] is shared  # nothing replaced
    tied = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})
    tied["b"].weight = tied["a"].weight
    with pytest.raises(ValueError, match=r"share one weight .*\['a, b'\]"):
        replace_linear_layers(tied, rank=2, targets=["a"])


def test_factors_larger_than_the_weight_warn_and_bad_inits_fail_first():
    import warnings

    from tunecomp import prepare

    model = nn.Sequential(nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8))
    with pytest.warns(UserWarning, match=r"2 of 2 layers got factors larger than their dense weight.*"
                                         r"0 \(rank 48: 2,352 -> 4,656\), 2 \(rank 8: 392 -> 456\)"):
        replace_linear_layers(model, rank=1000, targets=["0", "2"])  # capped at full rank, still larger
    model = nn.Sequential(nn.Linear(48, 48))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replace_linear_layers(model, rank_ratio=0.25, targets=["0"])  # 24·96 < 48·48: no warning
    with pytest.raises(ValueError, match=r"init must be one of \('svd', 'asvd', 'whiten'\); got 'foo'"):
        prepare(nn.Sequential(nn.Linear(4, 4)), rank=2, targets=["0"], init="foo")


def test_layers_their_parent_reads_the_weight_of_are_refused():
    """timm's BEiT (and EVA) attention computes F.linear(x, self.qkv.weight, qkv_bias) itself:
    swapped, the model failed at its first forward. Refused at surgery, naming the layers;
    the other targets still go."""
    kw = dict(pretrained=False, img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    model = timm.create_model("beit_base_patch16_224", **kw).eval()
    with pytest.raises(ValueError, match=r"holding \['blocks.0.attn.qkv'\] read their weight in their own forward"):
        replace_linear_layers(model, rank=8)
    assert type(model.blocks[0].attn.qkv) is nn.Linear and type(model.blocks[0].mlp.fc1) is nn.Linear
    report = replace_linear_layers(model, rank=8, targets=["attn.proj", "mlp.fc1", "mlp.fc2"])
    assert len(report.layers) == 3
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_a_weight_tied_to_another_kind_of_module_is_refused():
    """An output projection sharing its embedding's matrix: the student would train apart."""
    model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "out": nn.Linear(8, 10, bias=False)})
    model["out"].weight = model["emb"].weight
    with pytest.raises(ValueError, match=r"share one weight .*\['emb, out'\]"):
        replace_linear_layers(model, rank=2, targets=["out"])
    assert type(model["out"]) is nn.Linear


def test_classifier_heads_are_found_inside_wrappers_and_in_pairs():
    kw = dict(pretrained=False, img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    wrapped = nn.ModuleDict({"backbone": timm.create_model("vit_tiny_patch16_224", **kw)})
    report = replace_linear_layers(wrapped, rank=4, targets=["*"])
    assert "backbone.head" not in [l.name for l in report.layers] and len(report.layers) == 4
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", **kw)  # (head, head_dist)
    report = replace_linear_layers(distilled, rank=4, targets=["*"])
    assert {"head", "head_dist"}.isdisjoint(l.name for l in report.layers) and len(report.layers) == 4
    assert type(distilled.head_dist) is nn.Linear


def test_surgery_on_the_meta_device_and_nothing_swapped_when_a_layer_fails(monkeypatch):
    with torch.device("meta"):
        model = Plain()
    report = replace_linear_layers(model, rank=4, targets=["encoder.*"], keep_teacher=False)
    assert [l.params_after for l in report.layers] == [4 * (8 + 16) + 16, 4 * (16 + 8) + 8]
    assert isinstance(model.encoder[2], FusedPrunedLowRankLinear) and model.encoder[2].u.is_meta
    model = Plain()
    real = FusedPrunedLowRankLinear.from_linear.__func__
    calls = []

    def failing_second(cls, linear, *args, **kwargs):
        calls.append(linear)
        if len(calls) == 2:
            raise RuntimeError("decomposition failed")
        return real(cls, linear, *args, **kwargs)

    monkeypatch.setattr(FusedPrunedLowRankLinear, "from_linear", classmethod(failing_second))
    with pytest.raises(RuntimeError, match="decomposition failed"):
        replace_linear_layers(model, rank=4, targets=["encoder.*"])
    assert [type(m) for m in model.encoder] == [nn.Linear, nn.ReLU, nn.Linear]


def test_a_model_that_is_one_linear_is_refused():
    with pytest.raises(ValueError, match=r"the model is itself an nn.Linear.*from_linear"):
        replace_linear_layers(nn.Linear(8, 8), rank=2, targets=["*"])


def test_rank_arguments_take_numpy_numbers_and_refuse_bools():
    np = pytest.importorskip("numpy")
    assert rank_for(768, 768, rank=np.int64(8)) == 8 and type(rank_for(768, 768, rank=np.int64(8))) is int
    assert rank_for(768, 768, rank_ratio=np.float32(0.25)) == 192
    assert rank_for(768, 3072, param_ratio=0.5, rank_multiple=np.int64(4)) == 304
    with pytest.raises(ValueError, match=r"rank_ratio must be in \(0, 1\]; got True"):
        rank_for(8, 8, rank_ratio=True)
    with pytest.raises(ValueError, match=r"param_ratio must be in \(0, 1\]; got nan"):
        rank_for(8, 8, param_ratio=float("nan"))
