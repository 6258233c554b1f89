"""FusedPrunedLowRankLinear: drop-in behaviour, blend, state_dict, compile, accounting."""

import math

import pytest
import torch
from torch import nn

from conftest import random_mask, rel_error
from tunecomp import FusedPrunedLowRankLinear, reference


def linear(k=24, m=40, bias=True):
    return nn.Linear(k, m, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_student_reproduces_linear(bias):
    lin = linear(bias=bias)
    layer = FusedPrunedLowRankLinear.from_linear(lin, rank=24, keep_teacher=False)
    x = torch.randn(2, 5, 24)
    assert layer.alpha == 0.0 and not layer.has_teacher
    # SVD in float64, factors rounded to fp32: error ~ a few fp32 ulps of the output
    assert rel_error(layer(x), lin(x)) < 1e-5


def test_teacher_attached_starts_as_the_linear_and_blends():
    lin = linear()
    layer = FusedPrunedLowRankLinear.from_linear(lin, rank=4)  # far from full rank
    x = torch.randn(6, 24)
    assert layer.alpha == 1.0 and layer.has_teacher
    assert rel_error(layer(x), lin(x)) < 1e-6
    layer.alpha = 0.3
    student = reference.masked_lowrank_linear(x, layer.u, layer.v, layer.bias, layer.mask_u, layer.mask_v)
    expected = 0.3 * lin(x) + math.sqrt(1 - 0.09) * student
    assert rel_error(layer(x), expected) < 1e-6
    layer.alpha = 0.0
    assert rel_error(layer(x), student) < 1e-6


def test_alpha_checks():
    layer = FusedPrunedLowRankLinear.from_linear(linear(), rank=4)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]; got 1.5"):
        layer.alpha = 1.5
    with pytest.raises(TypeError, match="alpha must be a float"):
        layer.alpha = "high"
    with pytest.raises(ValueError, match=r"alpha must be one number; got a tensor of shape \(2,\)"):
        layer.alpha = torch.tensor([0.5, 0.5])
    layer.drop_teacher()
    with pytest.raises(ValueError, match="alpha must be 0 without a teacher"):
        layer.alpha = 0.5


def test_student_alone_loaded_from_a_blended_checkpoint_has_alpha_0():
    """strict=False leaves out the teacher's tensors: the layer computes the student alone, and
    says so (alpha 0), whatever alpha the checkpoint held."""
    blended = FusedPrunedLowRankLinear.from_linear(linear(), rank=4)
    blended.alpha = 0.4
    student = FusedPrunedLowRankLinear.from_linear(linear(), rank=4)
    student.drop_teacher()
    student.load_state_dict(blended.state_dict(), strict=False)
    assert student.alpha == 0.0 and float(student.alpha_tensor) == 0.0 and "alpha=0," in repr(student)
    x = torch.randn(3, 24)
    blended.alpha = 0.0
    assert torch.equal(student(x), blended(x))
    student.alpha = student.alpha  # what it reports can be set again


def test_drop_teacher_frees_buffers():
    layer = FusedPrunedLowRankLinear.from_linear(linear(), rank=4)
    assert "teacher_weight" in layer.state_dict()
    before = sum(b.numel() for b in layer.buffers())
    layer.drop_teacher()
    assert layer.teacher_weight is None and layer.teacher_bias is None and layer.alpha == 0.0
    assert "teacher_weight" not in layer.state_dict()
    assert before - sum(b.numel() for b in layer.buffers()) == 40 * 24 + 40


def test_gradients_flow_to_student_only():
    layer = FusedPrunedLowRankLinear.from_linear(linear(), rank=6)
    layer.alpha = 0.5
    layer.mask_u.copy_(random_mask(layer.mask_u.shape, 0.5))
    x = torch.randn(3, 24, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.bias.grad is not None
    assert torch.all(layer.u.grad[~layer.mask_u] == 0)
    assert torch.count_nonzero(layer.u.grad[layer.mask_u]) > 0
    assert not layer.teacher_weight.requires_grad
    assert [n for n, _ in layer.named_parameters()] == ["u", "v", "bias"]


def test_state_dict_round_trip():
    layer = FusedPrunedLowRankLinear.from_linear(linear(), rank=5)
    layer.alpha = 0.25
    layer.mask_v.copy_(random_mask(layer.mask_v.shape, 0.5))
    state = layer.state_dict()
    assert state["mask_v"].dtype == torch.bool and "alpha_tensor" in state
    clone = FusedPrunedLowRankLinear(24, 40, 5)
    clone.teacher_weight = torch.empty(40, 24)
    clone.teacher_bias = torch.empty(40)
    clone.load_state_dict(state)
    assert clone.alpha == 0.25  # the Python-side alpha follows the loaded buffer
    assert torch.equal(clone.mask_v, layer.mask_v)
    x = torch.randn(4, 24)
    assert torch.equal(clone(x), layer(x))


def test_alpha_stays_float32_when_module_is_cast():
    layer = FusedPrunedLowRankLinear.from_linear(linear(), rank=5)
    layer.alpha = 0.997  # bf16 would round this to 1.0 and silence the student
    layer = layer.to(torch.bfloat16)
    assert layer.u.dtype == torch.bfloat16 and layer.alpha_tensor.dtype == torch.float32
    assert layer.alpha_tensor.item() == pytest.approx(0.997, abs=1e-7)
    # ... and the student is not silenced downstream either: the factors' gradients match the
    # float64 reference (with the student's weight rounded to 1.0 first, they were zero)
    x, grad_y = torch.randn(6, 24, dtype=torch.bfloat16), torch.randn(6, 40, dtype=torch.bfloat16)
    layer(x).backward(grad_y)
    leaves = [t.detach().double().requires_grad_() for t in (layer.u, layer.v)]
    want = reference.blended_lowrank_linear(
        x.double(), *leaves, layer.bias.double(), layer.mask_u, layer.mask_v,
        layer.teacher_weight.double(), layer.teacher_bias.double(), 0.997)
    want.backward(grad_y.double())
    for got, leaf in zip((layer.u.grad, layer.v.grad), leaves):
        assert rel_error(got, leaf.grad) < 2e-2  # bf16: a few units of 2**-8


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_to_linear_computes_the_same(alpha):
    layer = FusedPrunedLowRankLinear.from_linear(linear(), rank=7)
    layer.alpha = alpha
    layer.mask_u.copy_(random_mask(layer.mask_u.shape, 0.7))
    dense = layer.to_linear()
    x = torch.randn(5, 24)
    assert isinstance(dense, nn.Linear) and dense.weight.shape == (40, 24)
    assert rel_error(dense(x), layer(x)) < 1e-5


def test_effective_params_sparsity_and_repr():
    layer = FusedPrunedLowRankLinear.from_linear(linear(), rank=8)
    assert layer.num_effective_params() == 8 * (24 + 40) + 40
    layer.mask_u[:, :4] = False  # 40*4 of 8*64 factor entries pruned: 4 components dead
    assert layer.num_effective_params() == 4 * (24 + 40) + 40  # their v entries not counted
    assert layer.sparsity == pytest.approx(160 / 512)
    text = repr(layer)
    for words in ("in_features=24", "out_features=40", "rank=8", "sparsity=31.2%", "teacher=attached"):
        assert words in text
    layer.mask_v[::2, 4] = False  # half of a live component's v: its u entries still count
    assert layer.num_effective_params() == 4 * (24 + 40) - 12 + 40
    from tunecomp.deploy import drop_dead_components, masked_factors

    u, v = drop_dead_components(*masked_factors(layer))  # what export stores
    assert layer.num_effective_params() == int((u != 0).sum() + (v != 0).sum()) + 40


def test_constructor_checks():
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(in_features, out_features\)\] = \[1, 24\]"):
        FusedPrunedLowRankLinear(24, 40, 25)
    with pytest.raises(ValueError, match="rank must be in"):
        FusedPrunedLowRankLinear(24, 40, 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        FusedPrunedLowRankLinear(24, 40, 2.5)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        FusedPrunedLowRankLinear(0, 40, 1)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        FusedPrunedLowRankLinear.from_linear(nn.Conv2d(3, 3, 1), rank=1)
    with pytest.raises(ValueError, match="init must be one of"):
        FusedPrunedLowRankLinear.from_linear(linear(), rank=4, init="pca")


def test_random_init_has_linear_like_scale():
    layer = FusedPrunedLowRankLinear(256, 256, 64, bias=False)
    weight, _ = layer.merged_weight()
    expected_var = 1.0 / (3 * 256)  # nn.Linear's default
    assert weight.var().item() == pytest.approx(expected_var, rel=0.2)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = FusedPrunedLowRankLinear.from_linear(nn.Linear(16, 24), rank=6)
        self.fc2 = FusedPrunedLowRankLinear.from_linear(nn.Linear(24, 8), rank=4, keep_teacher=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = TwoLayers()
    model.fc1.alpha = 0.5
    model.fc1.mask_u.copy_(random_mask(model.fc1.mask_u.shape, 0.6))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    eager_y = model(x)
    y = compiled(x)
    assert rel_error(y, eager_y) < 1e-5
    # gradients through the compiled graph match eager ones
    grads = torch.autograd.grad(y.sum(), [x, model.fc1.u, model.fc2.v])
    eager_grads = torch.autograd.grad(eager_y.sum(), [x, model.fc1.u, model.fc2.v])
    for got, want in zip(grads, eager_grads):
        assert rel_error(got, want) < 1e-5
    # a new alpha is read from the buffer: same compiled graph, new result, no recompile
    model.fc1.alpha = 0.2
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert rel_error(compiled(x), model(x)) < 1e-5


def test_load_with_assign_leaves_the_source_layer_alone():
    """load_state_dict(assign=True) hands the source's tensors over: the loaded layer's alpha
    buffer must become its own, or zeroing it (no teacher here) or setting a new alpha
    (teacher here) changes what the source layer computes."""
    source = FusedPrunedLowRankLinear.from_linear(linear(), rank=6)
    source.alpha = 0.4
    x = torch.randn(5, 24)
    with torch.no_grad():
        before = source(x)
    student = FusedPrunedLowRankLinear(24, 40, 6)
    student.load_state_dict(source.state_dict(), strict=False, assign=True)
    assert student.alpha == 0.0 and not student.has_teacher
    blended = FusedPrunedLowRankLinear(24, 40, 6)
    blended.teacher_weight, blended.teacher_bias = torch.zeros(40, 24), torch.zeros(40)
    blended.load_state_dict(source.state_dict(), assign=True)
    assert blended.alpha == pytest.approx(0.4)
    blended.alpha = 0.9
    with torch.no_grad():
        assert torch.equal(source(x), before)
    assert float(source.alpha_tensor) == pytest.approx(0.4)


def test_built_on_the_meta_device_then_materialised():
    """Deferred init (meta device, then to_empty and reset_parameters, as FSDP does): the
    repr and shape inference work on meta; afterwards every entry is kept and alpha is 0,
    whatever the new memory held."""
    with torch.device("meta"):
        layer = FusedPrunedLowRankLinear(64, 48, 8)
    assert "sparsity=unknown (meta)" in repr(layer)
    assert layer(torch.empty(2, 64, device="meta")).shape == (2, 48)
    garbage = torch.full((1 << 16,), 7, dtype=torch.uint8)  # freed memory with other bytes in it
    del garbage
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.mask_u.all() and layer.mask_v.all() and float(layer.alpha_tensor) == 0.0
    assert layer.sparsity == 0.0
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert rel_error(layer(x), x @ layer.v @ layer.u.T + layer.bias) < 1e-5


def test_torch_export_of_the_student_alone():
    """torch.export (non-strict, its default) of a layer without a teacher as the root module:
    once failed on the None teacher buffers registered before alpha's."""
    layer = FusedPrunedLowRankLinear.from_linear(linear(), rank=6, keep_teacher=False).eval()
    x = torch.randn(5, 24)
    exported = torch.export.export(layer, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), layer(x))
